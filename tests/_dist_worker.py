r"""Worker and shared data for ``tests/test_distributed.py`` (one rank of a 2-process gloo job).

Run as a script, one process per rank::

    python tests/_dist_worker.py RANK WORLD_SIZE INIT_METHOD OUT_DIR

Each rank runs every scenario in :data:`SCENARIOS` on its own data, then saves
``OUT_DIR/rank{RANK}.pt``: ``{scenario name: result dict, or the traceback text of an error}``.
The data generators are deterministic functions of ``(scenario, rank, step)`` so that the test process
can rebuild every rank's batches and replay them in one process ("the union of the ranks' batches").

Importing this module has no side effects (pytest imports it for doctests).
"""

from __future__ import annotations

import datetime
import sys
import traceback
from dataclasses import dataclass

import torch

IGNORE = 255

# ---------------------------------------------------------------------------------------------------------------
# Prototype EMA data: K = 6 classes with a presence pattern that covers every case of the sync contract.
#   class 0: on both ranks at every step
#   class 1: on rank 0 only
#   class 2: on rank 1 only
#   class 3: appears late (rank 1, from step 2), so it is initialised while the others are already averaged
#   class 4: rank 0 at step 0, then rank 1 at step 4 (untouched in between)
#   class 5: absent everywhere (must stay uninitialised on every rank)
# Step 1 gives rank 1 an all-ignore batch (zero local counts: it must still join the collective).
# ---------------------------------------------------------------------------------------------------------------
EMA_K, EMA_D, EMA_MOMENTUM = 6, 5, 0.5


@dataclass(frozen=True)
class EmaStep:
    """One update of the EMA scenario: how the call is made and what each rank feeds it."""

    kind: str  # "update" | "update_from_image" | "update_from_batch"
    dtype: torch.dtype
    grid: tuple[int, int]  # feature grid (h, w); labels are (2h, 2w) and are nearest-resized
    batch: tuple[int, int]  # batch size on rank 0, rank 1 (different on purpose)
    classes: tuple[tuple[int, ...], tuple[int, ...]]  # classes drawn on rank 0, rank 1 (empty: all ignore)


EMA_STEPS = (
    EmaStep("update", torch.float32, (4, 4), (2, 1), ((0, 1, 4), (0, 2))),
    EmaStep("update", torch.float32, (3, 5), (1, 2), ((0, 1), ())),
    EmaStep("update", torch.bfloat16, (4, 4), (2, 2), ((0, 1), (0, 2, 3))),
    EmaStep("update_from_image", torch.float32, (4, 3), (2, 1), ((0, 1), (0, 2, 3))),
    EmaStep("update_from_batch", torch.float64, (4, 4), (1, 2), ((0, 1), (0, 2, 3, 4))),
    EmaStep("update", torch.float64, (2, 3), (2, 2), ((1,), (0, 2))),
)


def _generator(*key: int) -> torch.Generator:
    seed = 0
    for part in key:
        seed = seed * 1009 + part
    return torch.Generator().manual_seed(seed)


def make_labels(
    classes: tuple[int, ...], batch: int, size: tuple[int, int], gen: torch.Generator
) -> torch.Tensor:
    """Labels ``(B, H, W)`` int64 drawn from ``classes`` plus ~25% ignore pixels (all ignore if no class)."""
    if not classes:
        return torch.full((batch, *size), IGNORE, dtype=torch.int64)
    choice = torch.tensor((*classes, IGNORE), dtype=torch.int64)
    weights = torch.tensor([3.0] * len(classes) + [float(len(classes))])
    index = torch.multinomial(weights, batch * size[0] * size[1], replacement=True, generator=gen)
    labels = choice[index].reshape(batch, *size)
    # Every listed class must really occur in each image, also after the 2x nearest resize (even rows and
    # columns survive), so the presence pattern is exact.
    labels[:, 0, 0 : 2 * len(classes) : 2] = choice[: len(classes)]
    return labels


def ema_batch(step: int, rank: int, scenario: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features ``(B, D, h, w)`` (in the step's dtype) and labels ``(B, 2h, 2w)`` of ``rank`` at ``step``."""
    spec = EMA_STEPS[step]
    gen = _generator(scenario, rank, step)
    batch, (h, w) = spec.batch[rank], spec.grid
    features = (torch.randn(batch, EMA_D, h, w, generator=gen, dtype=torch.float64) * 2 + rank).to(spec.dtype)
    labels = make_labels(spec.classes[rank], batch, (2 * h, 2 * w), gen)
    return features, labels


def ema_apply(ema, step: int, features: torch.Tensor, labels: torch.Tensor) -> None:
    """Feed one step's batch to ``ema`` the way the step says (``update`` or ``update_from``)."""
    from protocl import masked_average_pool

    kind = EMA_STEPS[step].kind
    if kind == "update":
        ema.update(features, labels)
        return
    pooled = masked_average_pool(features, labels, EMA_K, per_image=kind == "update_from_image")
    ema.update_from(pooled.prototypes, pooled.counts)


# ---------------------------------------------------------------------------------------------------------------
# ClassBalancedThresholds data: K = 5; class 0 and 4 predicted on both ranks, class 1 only on rank 0,
# class 2 only on rank 1, class 3 never predicted (threshold +inf). The last step is bf16.
# ---------------------------------------------------------------------------------------------------------------
THR_K, THR_PROPORTION = 5, 0.2
THR_STEPS = ((torch.float32, (3, 1)), (torch.float32, (1, 2)), (torch.bfloat16, (2, 2)))
_THR_MUTED = ((2, 3), (1, 3))  # classes whose logits are pushed to -30 on rank 0, rank 1


def thr_logits(step: int, rank: int, scenario: int = 1) -> torch.Tensor:
    """Logits ``(B, K, H, W)`` of ``rank`` at ``step`` (H, W = 6, 7)."""
    dtype, batch = THR_STEPS[step]
    gen = _generator(scenario, rank, step)
    logits = torch.randn(batch[rank], THR_K, 6, 7, generator=gen) * 3
    logits[:, list(_THR_MUTED[rank])] = -30.0
    return logits.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# BidirectionalContrast data: K = 4, D = 8, clustered features (class centre + noise), half-ignored static labels.
# ---------------------------------------------------------------------------------------------------------------
BC_K, BC_D, BC_STEPS, BC_BATCH = 4, 8, 3, (2, 1)
BC_KWARGS = {"momentum": 0.5, "threshold": 0.3}


def bc_batch(step: int, rank: int, scenario: int = 2) -> tuple[torch.Tensor, ...]:
    """``(source_features, source_labels, target_features, static_labels)`` of ``rank`` at ``step``."""
    gen = _generator(scenario, rank, step)
    centres = torch.randn(BC_K, BC_D, generator=_generator(scenario, 99)) * 2
    batch = BC_BATCH[rank]
    source_classes = (0, 1, 2) if rank == 0 else (0, 2, 3)
    source_labels = make_labels(source_classes, batch, (8, 8), gen)
    target_truth = make_labels((0, 1, 2, 3), batch, (8, 8), gen)
    source_features = _clustered(source_labels, centres, gen)
    target_features = _clustered(target_truth, centres + 0.5, gen)
    hide = torch.rand(target_truth.shape, generator=gen) < 0.5
    static_labels = torch.where(hide, IGNORE, target_truth)
    return source_features, source_labels, target_features, static_labels


def _clustered(labels: torch.Tensor, centres: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Features ``(B, D, h, w)`` on the 4x4 grid: centre of the nearest-resized label plus unit noise."""
    cells = labels[:, ::2, ::2]
    base = centres[cells.clamp_max(BC_K - 1)]  # b h w d
    noise = torch.randn(base.shape, generator=gen)
    return (base + noise).permute(0, 3, 1, 2).contiguous()  # b h w d -> b d h w


# ---------------------------------------------------------------------------------------------------------------
# Scenarios (run on each rank inside the process group)
# ---------------------------------------------------------------------------------------------------------------
class CollectiveCounter:
    """Counts calls of ``torch.distributed`` collectives while installed (a wrapper around each)."""

    NAMES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "broadcast",
        "all_reduce_coalesced",
    )

    def __init__(self) -> None:
        import torch.distributed as dist

        self.calls: list[str] = []
        self._originals = {}
        for name in self.NAMES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._originals[name] = original
            setattr(dist, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return original(*args, **kwargs)

        return wrapper

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


def scenario_ema(rank: int, counter: CollectiveCounter, sync: bool = True) -> dict:
    from protocl import PrototypeEMA

    ema = PrototypeEMA(EMA_K, EMA_D, momentum=EMA_MOMENTUM, sync=sync)
    snapshots, calls = [], []
    for step in range(len(EMA_STEPS)):
        features, labels = ema_batch(step, rank)
        counter.take()
        ema_apply(ema, step, features, labels)
        calls.append(counter.take())
        snapshots.append({"prototypes": ema.prototypes.clone(), "initialized": ema.initialized.clone()})
    return {"snapshots": snapshots, "calls": calls}


def scenario_thresholds(rank: int, counter: CollectiveCounter, sync: bool = True) -> dict:
    from protocl import ClassBalancedThresholds

    thresholds = ClassBalancedThresholds(THR_K, proportion=THR_PROPORTION, sync=sync)
    snapshots, calls = [], []
    for step in range(len(THR_STEPS)):
        counter.take()
        thresholds.update(thr_logits(step, rank))
        calls.append(counter.take())
        snapshots.append({"histogram": thresholds.histogram.clone(), "compute": thresholds.compute().clone()})
    return {"snapshots": snapshots, "calls": calls, "compute_calls": counter.take()}


def scenario_bidirectional(rank: int, counter: CollectiveCounter) -> dict:
    from protocl import BidirectionalContrast

    module = BidirectionalContrast(BC_K, BC_D, **BC_KWARGS)
    snapshots = []
    for step in range(BC_STEPS):
        out = module(*bc_batch(step, rank))
        snapshots.append(
            {
                "source": module.source_ema.prototypes.clone(),
                "source_initialized": module.source_ema.initialized.clone(),
                "target": module.target_ema.prototypes.clone(),
                "target_initialized": module.target_ema.initialized.clone(),
                "target_labels": out.target_labels.clone(),
            }
        )
    return {"snapshots": snapshots}


def scenario_helpers(rank: int, counter: CollectiveCounter) -> dict:
    from protocl import distributed

    value = torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64)
    returned = distributed.all_reduce_sum_(value)
    return {"is_distributed": distributed.is_distributed(), "value": value, "same_object": returned is value}


SCENARIOS = {
    "ema": scenario_ema,
    "ema_nosync": lambda rank, counter: scenario_ema(rank, counter, sync=False),
    "thresholds": scenario_thresholds,
    "thresholds_nosync": lambda rank, counter: scenario_thresholds(rank, counter, sync=False),
    "bidirectional": scenario_bidirectional,
    "helpers": scenario_helpers,
}


def main(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    counter = CollectiveCounter()
    results: dict[str, object] = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = scenario(rank, counter)
        except Exception:  # noqa: BLE001 - any failure is reported by the test that reads this scenario
            results[name] = traceback.format_exc()
        counter.take()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
