r"""Cross-rank consistency of protocl's stateful modules (issue 5), on CPU with gloo and 2 processes.

One 2-rank job (``tests/_dist_worker.py``) runs every scenario once per test session; each rank sees
different data (different batch sizes, classes present on one rank only, a rank with an all-ignore batch,
a class absent everywhere). The tests then check, in this process, that

* both ranks hold identical state after every update (``torch.equal``), and
* that state equals one process that saw the union of both ranks' batches (EMA: to fp32 rounding,
  histograms and thresholds: exactly), and the union itself matches naive float64 references,
* ``sync=False`` keeps the ranks independent, and nothing distributed is attempted without a process group.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import protocl
import protocl.distributed
from protocl import BidirectionalContrast, ClassBalancedThresholds, PrototypeEMA

WORKER_PATH = Path(__file__).with_name("_dist_worker.py")
WORLD_SIZE = 2
JOB_TIMEOUT_S = 240


def _load_worker():
    """The worker module, loaded by path (works whatever pytest's import mode)."""
    spec = importlib.util.spec_from_file_location("_protocl_dist_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


W = _load_worker()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Launch the 2-rank gloo job once; return each rank's ``{scenario: result | traceback}``."""
    out_dir = tmp_path_factory.mktemp("dist")
    init_method = f"file://{out_dir / 'rendezvous'}"
    package_root = str(Path(protocl.__file__).resolve().parents[1])  # the same protocl as this process
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    logs = [
        out_dir / f"rank{rank}.log" for rank in range(WORLD_SIZE)
    ]  # files: a full pipe cannot block a rank
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as stream:
            command = [
                sys.executable,
                str(WORKER_PATH),
                str(rank),
                str(WORLD_SIZE),
                init_method,
                str(out_dir),
            ]
            procs.append(subprocess.Popen(command, env=env, stdout=stream, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        if proc.returncode != 0:
            output = "\n".join(f"--- rank {r} ---\n{log.read_text()}" for r, log in enumerate(logs))
            pytest.fail(f"rank {rank} exited with {proc.returncode}:\n{output}")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD_SIZE)]


def _scenario(ranks: list[dict], name: str) -> list[dict]:
    """One scenario's result on each rank; fails the test with the rank's traceback if it raised."""
    results = [rank_results[name] for rank_results in ranks]
    for rank, result in enumerate(results):
        if isinstance(result, str):
            pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{result}")
    return results


def _assert_identical(a: dict, b: dict, what: str) -> None:
    for key, value in a.items():
        assert torch.equal(value, b[key]), f"{what}: {key!r} differs:\n{value}\n{b[key]}"


# ---------------------------------------------------------------------------------------------------------------
# Single-process references
# ---------------------------------------------------------------------------------------------------------------
def _cat_ranks(step: int, batch_fn) -> list[torch.Tensor]:
    """Concatenate, along B, what every rank was fed at ``step``."""
    parts = [batch_fn(step, rank) for rank in range(WORLD_SIZE)]
    return [torch.cat(tensors) for tensors in zip(*parts)]


def _ema_replay(batches) -> list[dict]:
    """Snapshots of one process's PrototypeEMA fed ``batches[step] = (features, labels)``."""
    ema = PrototypeEMA(W.EMA_K, W.EMA_D, momentum=W.EMA_MOMENTUM)
    snapshots = []
    for step, (features, labels) in enumerate(batches):
        W.ema_apply(ema, step, features, labels)
        snapshots.append({"prototypes": ema.prototypes.clone(), "initialized": ema.initialized.clone()})
    return snapshots


def _union_ema() -> list[dict]:
    return _ema_replay([_cat_ranks(step, W.ema_batch) for step in range(len(W.EMA_STEPS))])


def _naive_union_ema() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Loop-based float64 EMA over the union of the ranks' pixels (labels are exactly 2x the feature grid)."""
    prototypes = torch.zeros(W.EMA_K, W.EMA_D, dtype=torch.float64)
    initialized = torch.zeros(W.EMA_K, dtype=torch.bool)
    snapshots = []
    for step in range(len(W.EMA_STEPS)):
        features, labels = _cat_ranks(step, W.ema_batch)
        cells = labels[:, ::2, ::2]  # nearest resize by exactly 2: rows/columns 2i
        for k in range(W.EMA_K):
            pixels = features.double().permute(0, 2, 3, 1)[cells == k]  # b d h w -> (n d)
            if len(pixels) == 0:
                continue
            mean = pixels.mean(0)
            prototypes[k] = (
                W.EMA_MOMENTUM * prototypes[k] + (1 - W.EMA_MOMENTUM) * mean if initialized[k] else mean
            )
            initialized[k] = True
        snapshots.append((prototypes.clone(), initialized.clone()))
    return snapshots


def _thresholds_replay(logits_per_step) -> list[dict]:
    thresholds = ClassBalancedThresholds(W.THR_K, proportion=W.THR_PROPORTION)
    snapshots = []
    for logits in logits_per_step:
        thresholds.update(logits)
        snapshots.append({"histogram": thresholds.histogram.clone(), "compute": thresholds.compute().clone()})
    return snapshots


def _union_logits() -> list[torch.Tensor]:
    return [
        torch.cat([W.thr_logits(step, rank) for rank in range(WORLD_SIZE)])
        for step in range(len(W.THR_STEPS))
    ]


# ---------------------------------------------------------------------------------------------------------------
# PrototypeEMA
# ---------------------------------------------------------------------------------------------------------------
def test_ema_identical_across_ranks(ranks):
    rank0, rank1 = _scenario(ranks, "ema")
    for step, (a, b) in enumerate(zip(rank0["snapshots"], rank1["snapshots"])):
        _assert_identical(a, b, f"PrototypeEMA after step {step} ({W.EMA_STEPS[step].kind})")


def test_ema_equals_single_process_over_union(ranks):
    results = _scenario(ranks, "ema")
    expected = _union_ema()
    for rank, result in enumerate(results):
        for step, (got, want) in enumerate(zip(result["snapshots"], expected)):
            where = f"rank {rank}, step {step} ({W.EMA_STEPS[step].kind}, {W.EMA_STEPS[step].dtype})"
            assert got["prototypes"].dtype == torch.float32, where
            assert torch.equal(got["initialized"], want["initialized"]), where
            torch.testing.assert_close(got["prototypes"], want["prototypes"], rtol=1e-5, atol=1e-5, msg=where)


def test_ema_union_reference_matches_naive_float64():
    """The single-process reference above is itself right, and the data exercise every presence case."""
    expected = _naive_union_ema()
    for step, (got, (prototypes, initialized)) in enumerate(zip(_union_ema(), expected)):
        assert torch.equal(got["initialized"], initialized), f"step {step}"
        valid = initialized.nonzero().squeeze(1)
        torch.testing.assert_close(got["prototypes"][valid].double(), prototypes[valid], rtol=1e-5, atol=1e-5)
    # Presence pattern: class 3 starts at step 2, class 5 is never seen.
    assert [bool(initialized[3]) for _, initialized in expected] == [False, False, True, True, True, True]
    assert not expected[-1][1][5]


def test_ema_one_all_reduce_per_update(ranks):
    for rank, result in enumerate(_scenario(ranks, "ema")):
        for step, calls in enumerate(result["calls"]):
            assert calls == ["all_reduce"], f"rank {rank}, step {step}: collectives {calls}"


def test_ema_sync_false_keeps_ranks_independent(ranks):
    results = _scenario(ranks, "ema_nosync")
    for rank, result in enumerate(results):
        assert all(calls == [] for calls in result["calls"]), f"rank {rank}: {result['calls']}"
        expected = _ema_replay([W.ema_batch(step, rank) for step in range(len(W.EMA_STEPS))])
        for step, (got, want) in enumerate(zip(result["snapshots"], expected)):
            assert torch.equal(got["initialized"], want["initialized"]), f"rank {rank}, step {step}"
            torch.testing.assert_close(got["prototypes"], want["prototypes"], rtol=1e-6, atol=1e-6)
    # The data really differ per rank: class 1 is rank 0's only, class 2 rank 1's only.
    last0, last1 = results[0]["snapshots"][-1], results[1]["snapshots"][-1]
    assert last0["initialized"][1] and not last1["initialized"][1]
    assert last1["initialized"][2] and not last0["initialized"][2]
    assert not torch.allclose(last0["prototypes"][0], last1["prototypes"][0])


# ---------------------------------------------------------------------------------------------------------------
# ClassBalancedThresholds
# ---------------------------------------------------------------------------------------------------------------
def test_thresholds_identical_across_ranks(ranks):
    rank0, rank1 = _scenario(ranks, "thresholds")
    for step, (a, b) in enumerate(zip(rank0["snapshots"], rank1["snapshots"])):
        _assert_identical(a, b, f"ClassBalancedThresholds after update {step}")


def test_thresholds_equal_single_process_over_union(ranks):
    results = _scenario(ranks, "thresholds")
    expected = _thresholds_replay(_union_logits())
    for rank, result in enumerate(results):
        for step, (got, want) in enumerate(zip(result["snapshots"], expected)):
            assert got["histogram"].dtype == torch.int64
            assert torch.equal(got["histogram"], want["histogram"]), f"rank {rank}, update {step}: histogram"
            assert torch.equal(got["compute"], want["compute"]), f"rank {rank}, update {step}: compute()"


def test_thresholds_union_match_exact_quantiles(ranks):
    """compute() after sync: the n-th largest confidence over all ranks' pixels of each class, within 1e-3."""
    got = _scenario(ranks, "thresholds")[0]["snapshots"][-1]["compute"]
    probabilities = torch.cat([logits.float().softmax(1) for logits in _union_logits()])
    confidence, prediction = probabilities.max(1)
    for k in range(W.THR_K):
        values = confidence[prediction == k].double().sort(descending=True).values
        if len(values) == 0:
            assert got[k] == float("inf"), f"class {k} never predicted: expected +inf, got {got[k]}"
            continue
        exact = values[max(1, int(W.THR_PROPORTION * len(values))) - 1]
        assert abs(float(got[k]) - float(exact)) <= 1e-3, (
            f"class {k}: expected {float(exact)}, got {float(got[k])}"
        )
    assert torch.isfinite(got[[0, 1, 2, 4]]).all() and got[3] == float("inf")  # 1 and 2 live on one rank each


def test_thresholds_one_all_reduce_per_update(ranks):
    for rank, result in enumerate(_scenario(ranks, "thresholds")):
        for step, calls in enumerate(result["calls"]):
            assert calls == ["all_reduce"], f"rank {rank}, update {step}: collectives {calls}"


def test_thresholds_sync_false_keeps_ranks_independent(ranks):
    results = _scenario(ranks, "thresholds_nosync")
    for rank, result in enumerate(results):
        assert all(calls == [] for calls in result["calls"]) and result["compute_calls"] == []
        expected = _thresholds_replay([W.thr_logits(step, rank) for step in range(len(W.THR_STEPS))])
        for step, (got, want) in enumerate(zip(result["snapshots"], expected)):
            _assert_identical(got, want, f"rank {rank}, update {step} vs its own single process")
    last0, last1 = (result["snapshots"][-1]["compute"] for result in results)
    assert torch.isfinite(last0[1]) and last1[1] == float("inf")
    assert torch.isfinite(last1[2]) and last0[2] == float("inf")


# ---------------------------------------------------------------------------------------------------------------
# BidirectionalContrast: both EMAs stay identical across ranks; per-image outputs stay per-rank
# ---------------------------------------------------------------------------------------------------------------
def test_bidirectional_emas_identical_across_ranks(ranks):
    rank0, rank1 = _scenario(ranks, "bidirectional")
    for step, (a, b) in enumerate(zip(rank0["snapshots"], rank1["snapshots"])):
        state = ("source", "source_initialized", "target", "target_initialized")
        _assert_identical(
            {k: a[k] for k in state}, {k: b[k] for k in state}, f"BidirectionalContrast step {step}"
        )


def test_bidirectional_equals_single_process_over_union(ranks):
    results = _scenario(ranks, "bidirectional")
    module = BidirectionalContrast(W.BC_K, W.BC_D, **W.BC_KWARGS)
    offsets = [0, W.BC_BATCH[0], sum(W.BC_BATCH)]
    for step in range(W.BC_STEPS):
        out = module(*_cat_ranks(step, W.bc_batch))
        for rank, result in enumerate(results):
            got, where = result["snapshots"][step], f"rank {rank}, step {step}"
            for name in ("source", "target"):
                ema = getattr(module, f"{name}_ema")
                assert torch.equal(got[f"{name}_initialized"], ema.initialized), where
                torch.testing.assert_close(got[name], ema.prototypes, rtol=1e-5, atol=1e-5, msg=where)
            # Hybrid labels are per image: a rank's images get the labels the union run gives them.
            own = out.target_labels[offsets[rank] : offsets[rank + 1]]
            assert torch.equal(got["target_labels"], own), where
    assert module.source_ema.initialized.all() and module.target_ema.initialized.any()


# ---------------------------------------------------------------------------------------------------------------
# Helpers, and nothing distributed without a process group
# ---------------------------------------------------------------------------------------------------------------
def test_distributed_helpers_inside_process_group(ranks):
    for rank, result in enumerate(_scenario(ranks, "helpers")):
        assert result["is_distributed"] is True, f"rank {rank}"
        torch.testing.assert_close(
            result["value"], torch.tensor([3.0, 10.0], dtype=torch.float64), rtol=0, atol=0
        )


def test_distributed_helpers_without_process_group():
    assert not dist.is_available() or not dist.is_initialized()
    assert protocl.distributed.is_distributed() is False
    value = torch.tensor([1.0, 2.0])
    protocl.distributed.all_reduce_sum_(value)
    assert torch.equal(value, torch.tensor([1.0, 2.0]))


@pytest.fixture
def forbid_collectives(monkeypatch):
    """Make every torch.distributed collective raise, so any attempt fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch.distributed collective was called without a process group")

    for name in W.CollectiveCounter.NAMES:
        if hasattr(dist, name):
            monkeypatch.setattr(dist, name, forbidden)
        if hasattr(protocl.distributed, name):
            monkeypatch.setattr(protocl.distributed, name, forbidden)


def test_no_collective_without_process_group(forbid_collectives):
    features, labels = W.ema_batch(0, 0)
    synced, local = PrototypeEMA(W.EMA_K, W.EMA_D), PrototypeEMA(W.EMA_K, W.EMA_D, sync=False)
    for ema in (synced, local):
        ema.update(features, labels)
        ema.update_from(*protocl.masked_average_pool(features, labels, W.EMA_K))
    assert torch.equal(synced.prototypes, local.prototypes)
    assert torch.equal(synced.initialized, local.initialized)

    logits = W.thr_logits(0, 0)
    synced, local = ClassBalancedThresholds(W.THR_K), ClassBalancedThresholds(W.THR_K, sync=False)
    for thresholds in (synced, local):
        thresholds.update(logits)
    assert torch.equal(synced.histogram, local.histogram)
    assert torch.equal(synced.compute(), local.compute())


@pytest.mark.parametrize("sync", [True, False])
def test_bidirectional_passes_sync_to_both_emas(sync):
    module = BidirectionalContrast(W.BC_K, W.BC_D, sync=sync)
    assert module.source_ema.sync is sync and module.target_ema.sync is sync
