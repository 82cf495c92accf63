r"""Round decisions (``--round-decisions score``, issue 27): keep a round of stage 2 only if a label-free score
of the model on the target says it helped; otherwise restore the round's start and spend its budget on source-only
steps (so that the worst case is the same-budget control), and deliver the best-scored model.

The score (``--round-score``, default ``flip_agreement``: the share of pixels whose prediction survives a
horizontal flip) is :func:`uda.score.target_scores` on a fixed unlabelled subset, the first ``--score-images``
target-train images at the static labels' size; no target label is read. Its validation, round by round on every
shift of the study, is in docs/examples.md ("Issue 27").

One round, with decisions on (the loop calls :func:`begin_round`, then trains the round, then :func:`decide`):

1. :func:`begin_round`: the first time, score the source model (the start of stage 2); every round, write its
   starting state (model, optimizer, scaler, orchestrator) to ``<out>/round_start.pt``;
2. the round trains as always (static labels, steps, evaluation, reports);
3. :func:`decide`: score the model; ``score >= score at the round's start - T`` keeps the round
   (``--score-tolerance T``, default 0.003: the score's round-to-round noise); otherwise the round's start is
   restored and ``state["fallback"]`` is set: the loop runs the round's budget with the round's lr schedule
   (``--fallback``: source-only steps by default; or the round's static labels only, or its target terms without
   the classes its signals flagged: :func:`fallback_terms`), then :func:`end_fallback` scores the result;
4. after the last round, :func:`deliver` loads the best-scored model (``<out>/best_scored.pt``: the latest model
   scored within T of the best score) when it is not the current one: that is ``adapted.pt``.

Everything is in the checkpoint dict (``state["decisions"]``) or in the two files, written atomically before the
checkpoint that refers to them: a resumed run decides exactly as an uninterrupted one. Under torch.distributed
every rank scores its own copy of the model and takes rank 0's score (one broadcast), so all ranks decide alike.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import Dataset

from . import checkpoint, dist
from . import score as scores
from .classes import int_ranges
from .loading import PseudoLabelSet
from .reliability import flagged_weights
from .run import AMP_DTYPES, Run

__all__ = ["MODES", "FALLBACKS", "enabled", "new_record", "batches", "score_model", "begin_round", "decide",
           "fallback_terms", "end_fallback", "deliver", "summary"]

MODES = ("off", "score")
FALLBACKS = {"source": "source-only", "static": "static-label", "drop-flagged": "drop-flagged"}  # --fallback
ROUND_START, BEST = "round_start.pt", "best_scored.pt"


def enabled(run: Run) -> bool:
    return run.args.round_decisions == "score"


def new_record(name: str) -> dict:
    """``state["decisions"]``: the score's name, the reference (the score of the model the next round starts
    from), the best score and where it came from, and one entry per round."""
    return {"score": name, "reference": None, "best": None, "best_from": None, "delivered": None, "start": None,
            "rounds": []}


def _subset(run: Run) -> Dataset:
    return PseudoLabelSet(run.target_train[: run.args.score_images], resize=run.args.resize,
                          on_bad_sample=run.args.on_bad_sample)


def batches(data: Dataset, size: int = 8):
    """The items of ``data`` in order, stacked ``size`` at a time (a batch ends early where the image size changes:
    images resized by their short side differ in width when aspect ratios do). No DataLoader: it would draw from
    the global RNG and move the run's."""
    items: list = []
    for j in range(len(data)):
        item = data[j]
        if items and (len(items) == size or item["image"].shape != items[0]["image"].shape):
            yield _stack(items)
            items = []
        items.append(item)
    if items:
        yield _stack(items)


def _stack(items: list) -> dict:
    batch = {"image": torch.stack([it["image"] for it in items])}
    if "skipped" in items[0]:
        batch["skipped"] = torch.stack([torch.as_tensor(it["skipped"]) for it in items])
    return batch


def score_model(run: Run) -> float:
    """The ``--round-score`` of the current model on the scoring subset (rank 0's value on every rank)."""
    name = run.args.round_score
    values = scores.target_scores(run.model, batches(_subset(run)), run.device, num_classes=run.num_classes,
                                  flip=name == "flip_agreement", amp_dtype=AMP_DTYPES[run.args.amp])
    value = [float(values[name])]
    if run.world > 1:
        torch.distributed.broadcast_object_list(value, src=0)
    run.model.train()
    return value[0]


def _snapshot(run: Run, name: str, **extra) -> None:
    if run.rank == 0:
        checkpoint.save_atomic({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                                "scaler": run.scaler.state_dict(), "contrast": run.contrast.state_dict(), **extra},
                               run.out / name)
    dist.barrier()


def _restore(run: Run, name: str) -> dict:
    saved = checkpoint.load(run.out / name, name)
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler"):
        run.scaler.load_state_dict(saved["scaler"])
    run.contrast.load_state_dict(saved["contrast"])
    return saved


def _best(run: Run, record: dict, value: float, where: str) -> None:
    """Keep ``<out>/best_scored.pt`` when ``value`` is within ``--score-tolerance`` of the best score so far (at
    0: the best; ties and scores within the tolerance: the later model). ``record["best"]`` is the best score,
    ``record["delivered"]`` that of the kept model."""
    if record["best"] is None or not value < record["best"] - run.args.score_tolerance:
        record["best"] = value if record["best"] is None else max(record["best"], value)
        record["best_from"], record["delivered"] = where, value
        _snapshot(run, BEST, round=where)


def begin_round(run: Run, state: dict) -> None:
    """Before a round's static labels (iteration 0): the first time, score the source model; write the round's
    starting state."""
    record = state["decisions"]
    if record["reference"] is None:
        value = score_model(run)
        record.update(reference=value, start=value)
        run.log(f"round decisions: label-free score {record['score']} of the source model {value:.4f} "
                f"(first {run.args.score_images} target-train images, no label read)")
        _best(run, record, value, "source model")
    _snapshot(run, ROUND_START, round=state["round"])


def decide(run: Run, state: dict) -> bool:
    """After a round (evaluated and reported, before its checkpoint): keep it if its score did not fall below the
    score at its start by more than ``--score-tolerance``; otherwise restore the start and set
    ``state["fallback"]``. Returns whether it was kept."""
    record, r = state["decisions"], state["round"]
    value, before = score_model(run), record["reference"]
    kept = not value < before - run.args.score_tolerance
    entry = {"round": r, "score_before": before, "score_after": value, "kept": kept,
             "miou": state["metrics"]["rounds"][-1]["miou"]}
    record["rounds"].append(entry)
    if kept:
        record["reference"] = value
        _best(run, record, value, f"round {r}")
        run.log(f"round {r}: kept (label-free score {record['score']} {before:.4f} -> {value:.4f})")
    else:
        _restore(run, ROUND_START)
        state["fallback"] = True
        run.log(f"round {r}: undone (label-free score {record['score']} fell {before:.4f} -> {value:.4f}"
                + (f", more than --score-tolerance {run.args.score_tolerance:g}" if run.args.score_tolerance else "")
                + f"): the round's start is restored and its budget is spent on {_spent(run)}")
    return kept


def _spent(run: Run) -> str:
    return {"source": "source-only steps", "static": "steps on its static labels only (no dynamic labels, no "
            "FCL/BCL)", "drop-flagged": "its target terms without the classes its signals flagged"}[run.args.fallback]


@contextlib.contextmanager
def fallback_terms(run: Run, state: dict):
    """Around an undone round's ``--fallback static`` / ``drop-flagged`` steps (the loop's ``adapt_step`` on the
    round's own static labels): yields the step's keyword arguments. ``static``: the orchestrator without
    dynamic labels and with FCL/BCL weights 0, no rectification (restored afterwards); ``drop-flagged``:
    ``class_weight`` 0 for the classes whose dynamic/static agreement in the undone round was below 50 %
    (:func:`uda.reliability.flagged_weights`), 1 for the others."""
    c, teacher = run.contrast, run.teacher
    saved = (c.dynamic, c.fcl_weight, c.bcl_weight)
    try:
        if run.args.fallback == "static":
            c.dynamic, c.fcl_weight, c.bcl_weight, run.teacher = False, 0.0, 0.0, None
            yield {}
        else:
            entry = state["metrics"]["signals"][-1]  # the undone round's (uda.report.end_round)
            weights = flagged_weights(entry["static_agreement"], run.device)
            flagged = [run.table.names[k] for k, w in enumerate(weights.tolist()) if w == 0]
            run.log(f"round {state['round']}: drop-flagged fallback, the target terms without "
                    + (", ".join(flagged) if flagged else "no class (none flagged)"))
            yield {"class_weight": weights}
    finally:
        (c.dynamic, c.fcl_weight, c.bcl_weight), run.teacher = saved, teacher


def end_fallback(run: Run, state: dict, miou: float) -> None:
    """After a round's fallback: its score is the next round's reference."""
    record = state["decisions"]
    value = score_model(run)
    entry = record["rounds"][-1]
    entry.update(fallback_score=value, fallback_miou=miou, fallback=run.args.fallback)
    record["reference"] = value
    what = FALLBACKS[run.args.fallback]
    _best(run, record, value, f"round {entry['round']} ({what} fallback)")
    run.log(f"round {entry['round']}: {what} fallback done, label-free score {record['score']} {value:.4f}")


def deliver(run: Run, state: dict) -> bool:
    """After the last round: load the best-scored model when it is not the current one. Returns True if it
    loaded another model (the caller evaluates it)."""
    record = state["decisions"]
    if record["best_from"] == _last(record):
        return False
    _restore(run, BEST)
    run.log(f"round decisions: delivering the best-scored model ({record['best_from']}, label-free score "
            f"{record['score']} {_delivered(record):.4f})")
    return True


def _last(record: dict) -> str:
    if not record["rounds"]:
        return "source model"
    last = record["rounds"][-1]
    if last["kept"]:
        return f"round {last['round']}"
    return f"round {last['round']} ({FALLBACKS[last.get('fallback', 'source')]} fallback)"


def _delivered(record: dict) -> float:
    return record["best"] if record.get("delivered") is None else record["delivered"]


def summary(record: dict, rounds: int) -> str:
    """``kept rounds 0-1 of 3; label-free score flip_agreement 0.9120 -> 0.9340 (best: round 1)``."""
    kept = [e["round"] for e in record["rounds"] if e["kept"]]
    what = f"kept rounds {int_ranges(kept, ', ')}" if kept else "kept no round"
    return (f"{what} of {rounds}; label-free score {record['score']} {record['start']:.4f} -> "
            f"{_delivered(record):.4f} "
            f"(delivered: {record['best_from']})")
