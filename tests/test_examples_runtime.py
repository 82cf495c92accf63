"""The reference pipeline as a GPU user runs it: one device per op, no host sync in the training steps, mixed
precision, exact resume with a GradScaler, TensorBoard; CUDA-only checks are marked ``needs_cuda``.

Without a GPU, two CPU checks stand in for CUDA's sync-debug mode:

- the real steps run with model, orchestrator and batches on the ``meta`` device under a dispatch mode that
  records every op whose tensor arguments live on more than one device (a CPU tensor created by mistake next
  to device tensors, the class of bug of ``torch.stack([cuda_count, torch.tensor(n)])``); on ``meta`` any read
  of a value (``.item()``, ``bool()``, ``.cpu()``, ``.tolist()``, ``.numpy()``) raises as well;
- the whole pipeline runs on CPU with a dispatch mode around every training step that records the ops that
  read device values on the host (``aten._local_scalar_dense`` behind ``.item()``/``bool()``/``float()``,
  ``nonzero``, ``unique``, ``masked_select``, ``bincount``, boolean indexing): only the steps that run
  protocl's value checks (first of a stage or round) may have any.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import train_gta2cs
from examples_helpers import (
    TINY_RUN,
    assert_same_state,
    build,
    crash_after,
    data_args,
    load_checkpoint,
    train_with,
    write_fixture,
)
from uda import diagnostics
from uda.loading import pseudo_label_size
from uda import state as uda_state
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import protocl

SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.nonzero_static",
            "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
            "aten.masked_select", "aten.bincount", "aten.repeat_interleave"}


def _tensors(values):
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)


class OpRecorder(TorchDispatchMode):
    """Records the ops whose tensor arguments span several devices, and the ops that read device values."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[str] = []
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        tensors = list(_tensors([*args, *kwargs.values()]))
        if len({t.device for t in tensors}) > 1 and name != "aten.copy_":
            self.mixed.append(f"{func}: {sorted({str(t.device) for t in tensors})}")
        boolean_index = name == "aten.index" and any(t.dtype == torch.bool for t in _tensors(args[1:]))
        if name in SYNC_OPS or boolean_index:
            self.syncs.append(str(func))
        return func(*args, **kwargs)


def sync_watch(steps: list):
    """A ``step_context`` that records each training step's device reads with :class:`OpRecorder`: appends
    ``(kind, checked, syncs, value checks enabled)`` to ``steps``."""

    class Watch:
        def __init__(self, kind, checked):
            self.kind, self.checked, self.recorder = kind, checked, OpRecorder()

        def __enter__(self):
            self.recorder.__enter__()

        def __exit__(self, *exc):
            self.recorder.__exit__(*exc)
            steps.append((self.kind, self.checked, self.recorder.syncs, protocl.value_checks_enabled()))

    return Watch


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("runtime"))


# ---------------------------------------------------------------------------------------------- devices
def _fake_static_labels(samples, resize: int, out: Path) -> Path:
    out.mkdir(parents=True)
    g = np.random.default_rng(0)
    for sample in samples:
        w, h = pseudo_label_size(sample, resize)
        labels = np.where(g.random((h, w)) < 0.5, g.integers(0, 19, (h, w)), 255).astype(np.uint8)
        Image.fromarray(labels).save(out / f"{sample.name}.png")
    return out


def test_steps_use_one_device_per_op_on_meta(roots, tmp_path):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--device", "meta", "--diagnostics"])
    state = uda_state.new_state(run)
    run.target_set.pseudo_dir = _fake_static_labels(run.target_train, 32, tmp_path / "static")
    protocl.set_value_checks(False)
    batches = [next(run.source_stream) for _ in range(3)] + [next(run.target_stream)]  # host-side, on the CPU
    recorder = OpRecorder()
    with recorder:
        source = train_gta2cs.source_step(run, batches[0])
        adapted, labels_used = train_gta2cs.adapt_step(run, batches[1], batches[3])
        control = train_gta2cs.source_step(run, batches[2])  # the same-budget control's step
        logits = torch.randn(1, 19, 8, 12, device="meta")
        thresholds = protocl.ClassBalancedThresholds(19, proportion=0.1, sync=False).to("meta")
        thresholds.update(logits)
        labels = protocl.static_pseudo_label(logits, class_thresholds=thresholds.compute(), proportion=0.1)
        counted = [diagnostics.class_counts(labels, labels, 19)]
    assert recorder.mixed == [] and recorder.syncs == []
    for value in [*source.values(), *adapted.values(), *control.values(), *counted, *labels_used.values(),
                  state["label_counts"]]:
        assert value.device.type == "meta"
    assert set(adapted) >= {"ce_tgt", "fcl", "bcl", "cov_static", "cov_dynamic", "cov_hybrid"}
    # the checker sees the bug this test exists for (a CPU count stacked with a device count)
    with pytest.raises(RuntimeError), OpRecorder() as bad:
        torch.stack([(labels != 255).sum(), torch.tensor(labels.numel())])
    assert bad.mixed


def test_class_counts_against_a_loop():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 6, 7), generator=g)
    gt = torch.randint(0, 5, (2, 6, 7), generator=g)
    labels[labels == 4], gt[gt == 4] = 255, 255
    got = diagnostics.class_counts(labels, gt, 4)
    ref = torch.zeros(4, 4, dtype=torch.int64)
    for y, t in zip(labels.flatten().tolist(), gt.flatten().tolist()):
        if t != 255:
            ref[0, t] += 1
            if y != 255:
                ref[1, t] += 1
                ref[2, y] += 1
                ref[3, t] += y == t
    assert torch.equal(got, ref)
    summary = diagnostics.summarize(got)
    coverage = [100 * c / n for c, n in zip(ref[1].tolist(), ref[0].tolist())]
    precision = [100 * c / n for c, n in zip(ref[3].tolist(), ref[2].tolist())]
    assert summary["coverage"] == pytest.approx(coverage) and summary["precision"] == pytest.approx(precision)
    # class means are means over classes, not pixel-weighted
    assert summary["class_mean_precision"] == pytest.approx(sum(precision) / 4)
    assert summary["pixel_precision"] == pytest.approx(100 * ref[3].sum() / ref[2].sum())


# ---------------------------------------------------------------------------------------------- syncs
def test_training_steps_read_no_device_value_except_value_checks(roots, tmp_path):
    """The real loop (stage 1, rounds, control) with diagnostics: only checked steps may read device values."""
    gta, cs = roots
    argv = [*data_args(gta, cs, tmp_path), *TINY_RUN, "--diagnostics", "--control", "--log-every", "3",
            "--round-decisions", "off"]  # the paper's schedule: no round is undone
    steps = []
    assert train_with(argv, sync_watch(steps)) == 0
    kinds = [kind for kind, *_ in steps]
    assert kinds == ["source"] * 6 + ["adapt"] * 8 + ["control"] * 8
    checked = [i for i, (_, flag, _, enabled) in enumerate(steps) if flag]
    assert checked == [0, 6, 10, 14, 18]  # the first step of stage 1, of each round, of each control round
    assert all(enabled == flag for _, flag, _, enabled in steps)  # value checks on exactly there
    unchecked = [(i, syncs) for i, (_, flag, syncs, _) in enumerate(steps) if not flag and syncs]
    assert unchecked == []
    assert steps[6][2] and steps[10][2]  # the recorder does see the value checks' host reads
    assert protocl.value_checks_enabled()  # restored after the run
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [d["round"] for d in metrics["diagnostics"]] == [0, 1]


def test_value_checks_always(roots, tmp_path):
    gta, cs = roots
    argv = [*data_args(gta, cs, tmp_path), *TINY_RUN, "--value-checks", "always", "--rounds", "1"]
    seen = []
    assert train_with(argv, lambda kind, checked: seen.append((checked, protocl.value_checks_enabled())) or _Null()) == 0
    assert seen and all(flag and enabled for flag, enabled in seen)


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------- precision
def test_amp_forward_keeps_losses_in_fp32(roots, tmp_path):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--amp", "bf16"])
    logits, features = train_gta2cs.forward(run, run.model, torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert logits.dtype == torch.float32 and features.dtype == torch.bfloat16
    labels = torch.randint(0, 19, (2, 32, 32))
    out = run.contrast(features, labels, features, labels)
    assert out.loss.dtype == torch.float32 and protocl.entropy_loss(logits).dtype == torch.float32
    assert not run.scaler.is_enabled()
    assert build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--amp", "fp16"]).scaler.is_enabled()


def test_resume_is_exact_with_fp16_scaler_and_diagnostics(roots, tmp_path):
    """Interrupted in stage 1 and inside round 1, resumed twice: bitwise the uninterrupted fp16 run, including the
    GradScaler state and the per-class diagnostic counts of the round in progress."""
    gta, cs = roots
    extra = [*TINY_RUN, "--amp", "fp16", "--diagnostics"]
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path / "full"), *extra]) == 0
    base = [*data_args(gta, cs, tmp_path / "cut"), *extra]
    assert train_with(base, crash_after(5)) == 1
    resume = ["--resume", str(tmp_path / "cut" / "checkpoint.pt")]
    assert train_with(base + resume, crash_after(13 - 4)) == 1
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (ckpt["round"], ckpt["iteration"]) == (1, 2) and int(ckpt["label_counts"].sum()) > 0
    assert train_gta2cs.main(base + resume) == 0
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert set(a["scaler"]) >= {"scale", "_growth_tracker"}  # the fp16 scaler is on and saved
    for key in ("model", "contrast", "optimizer", "scaler", "streams", "label_counts"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])


# ---------------------------------------------------------------------------------------------- tensorboard
def test_tensorboard_scalars(roots, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    gta, cs = roots
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path), *TINY_RUN, "--rounds", "1", "--tensorboard",
                              "--diagnostics"]) == 0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/ce_src", "train/ce_tgt", "train/fcl", "train/cov_hybrid", "eval/miou",
            "train/class_mean_precision_hybrid"} <= tags
    assert [e.step for e in events.Scalars("eval/miou")] == [6, 10]  # after stage 1 and after the round


def test_tensorboard_missing_is_a_clear_error(roots, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torch.utils.tensorboard", None)
    gta, cs = roots
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path), *TINY_RUN, "--tensorboard"]) == 2
    assert "expected the tensorboard package for --tensorboard (pip install tensorboard" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_cuda_pipeline_steps_under_sync_debug_error(roots, tmp_path, amp):
    """Every stage on CUDA, DataLoader workers with pinned memory, every unchecked step under sync-debug "error"."""
    gta, cs = roots
    argv = [*data_args(gta, cs, tmp_path), *TINY_RUN, "--device", "cuda", "--sync-debug", "--amp", amp,
            "--workers", "2", "--diagnostics", "--control"]
    modes = []
    assert train_with(argv, lambda kind, checked: modes.append((checked, torch.cuda.get_sync_debug_mode()))
                      or _Null()) == 0
    assert len(modes) == 22 and all(mode == (0 if checked else 2) for checked, mode in modes)
    assert torch.cuda.get_sync_debug_mode() == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= metrics["adapted"]["miou"] <= 100 and len(metrics["diagnostics"]) == 2
    assert (tmp_path / "figures" / "pseudo_labels_round_01.png").is_file()


@pytest.mark.needs_cuda
def test_cuda_static_label_pass_and_step_tensors_on_one_device(roots, tmp_path):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--device", "cuda", "--diagnostics"])
    train_gta2cs.make_static_labels(run, 0)  # the pass that stacked a CUDA count with a CPU count
    protocl.set_value_checks(False)
    src, tgt = next(run.source_stream), next(run.target_stream)
    recorder = OpRecorder()
    with recorder:
        stats, _ = train_gta2cs.adapt_step(run, src, tgt)
    assert recorder.mixed == [] and all(v.is_cuda for v in stats.values())
    assert recorder.syncs == []


def test_score_tensors_stay_on_the_inputs_device():
    """uda.score (round decisions): every tensor it makes follows its inputs' device (meta here), none on the CPU."""
    from uda import score

    f, p = torch.randn(5, 4, device="meta"), torch.randn(3, 4, device="meta")
    y = torch.zeros(5, dtype=torch.long, device="meta")
    with OpRecorder() as recorder:
        score.prototype_scores(f, y, p)
        score.separation(p)
    assert recorder.mixed == []
