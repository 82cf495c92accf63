r"""Bi-directional prototype contrast for domain adaptive segmentation: protocl's reference pipeline (spec §4).

A script to read and copy, in the order a run calls it: :func:`main` -> :func:`setup` -> :func:`start` (new,
resumed, or from ``--source-checkpoint``) -> stage 1 (:func:`train_source`, :func:`end_source`) -> the rounds of
stage 2 (:func:`make_static_labels`, :func:`adapt_round` whose step is :func:`adapt_step`, the round's end) ->
the same-budget control (:func:`train_control`, ``--control``) -> :func:`finish`. Everything else is a library
call: protocl's public API, and the package ``uda/`` (``uda/__init__.py`` lists its modules: the run's set-up,
state and checkpoints, reports, data, model).

Without dataset paths it runs the embedded demo (a small synthetic two-domain dataset, a tiny CNN, a few minutes
on a CPU); with them, DeepLab-V2 ResNet-101 and the paper's settings:

    python examples/train_gta2cs.py
    python examples/train_gta2cs.py --gta5-root /data/GTA5 --cityscapes-root /data/cityscapes \
        --init resnet101-imagenet.pth --out runs/gta2cs --device cuda --amp bf16
    torchrun --nproc_per_node=4 examples/train_gta2cs.py ... (the same arguments)

Other benchmarks and your own classes: ``--source {gta5,synthia,cityscapes,folder}``,
``--target {cityscapes,acdc,darkzurich,folder}``, ``--class-table`` (docs/datasets.md).

Stage 1 trains on labelled source crops (cross-entropy) and keeps the last weights. Stage 2 adapts in rounds:
static pseudo labels of the whole target train split at the start of each round; every step the orchestrator
:class:`protocl.BidirectionalContrast` turns them into hybrid labels y_T and returns FCL + BCL; the step loss is

    CE(source) + 0.3·CE(target, y_T) + 0.4·(H(source) + 0.3·H(target)) + λ_FCL·FCL + λ_BCL·BCL.

No step synchronises with the host: losses and statistics stay on the device until the log point (every
``--log-every`` steps); protocl's value checks run on the first step of each stage and round only. A long run
(docs/reproduce.md): safe loading, a pre-flight data check, ``--on-bad-sample``, SIGTERM/SIGUSR1 -> checkpoint
and exit 75, ``--resume auto``, a non-finite guard.

Round decisions (``--round-decisions score``, an option; :mod:`uda.decisions`): a round is kept unless a
label-free score of the model on the target fell (by more than ``--score-tolerance``); an undone round's start
is restored and its budget spent again as ``--fallback`` says (:func:`fallback_round`); the best-scored model is
delivered, and the control is selected by the same rule. Off (the default) is the paper's behaviour. The last line
printed is ``target mIoU: source-only X.XX -> adapted Y.YY`` (with decisions: which model was delivered and what it
contains; docs/examples.md, docs/troubleshooting.md).
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from uda import checkpoint, decisions, diagnostics, reliability, runtime, signals
from uda.options import parse_args
from uda.reliability import safe_cross_entropy
from uda.report import end_round, evaluate, finish
from uda.run import Run, forward, setup
from uda.state import accumulate, begin_phase, check_finite, next_batch, run_script, save, save_model, start, watch
from uda.state import end_iteration as state_end_iteration
from uda.static_labels import make_static_labels

import protocl
from protocl import IGNORE_INDEX

__all__ = ["main", "setup", "start", "train", "train_source", "end_source", "make_static_labels", "adapt_round",
           "adapt_step", "source_step", "source_round", "train_control", "fallback_round", "finish"]

StepContext = Callable[[str, bool], contextlib.AbstractContextManager]  # (kind, checked) -> context manager


# ---------------------------------------------------------------------------------------------- one step
def optimize(run: Run, loss: Tensor) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()


def source_step(run: Run, src: dict) -> dict[str, Tensor]:
    """One source-only step (stage 1 and the same-budget control): CE on the source crops."""
    labels = src["label"].to(run.device, non_blocking=True).long()
    logits, _ = forward(run, run.net, src["image"])
    loss = safe_cross_entropy(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                              labels)
    optimize(run, loss)
    return {"ce_src": loss.detach()}


def adapt_step(run: Run, src: dict, tgt: dict, *, target_labels: Callable | None = None,
               class_weight: Tensor | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """One stage-2 step on a source and a target batch. Returns the step's statistics (device tensors, read at
    the log point; with ``--signals`` also ``signal_counts``, :mod:`uda.signals`) and the target labels it used
    (``static`` y_F, ``dynamic`` y_D, ``hybrid`` = what the target CE trained on).

    ``target_labels(out, y_f, target_logits, sims)`` chooses the target CE's labels from the orchestrator's output
    ``out`` and the cosines behind ``out.dynamic_labels`` (:class:`uda.signals.Similarities`); default
    ``run.target_ce`` (``--target-ce``; None: the paper's hybrid y_T). FCL/BCL always use the orchestrator's y_T.
    ``class_weight`` ``(K,)`` weighs FCL/BCL and the target CE by class (``--reliability-weight``, ``--fallback
    drop-flagged``); with ``--rectify`` (``run.teacher``) rectified labels replace the dynamic ones
    (:mod:`uda.reliability`)."""
    b = src["image"].shape[0]
    images = torch.cat([src["image"].to(run.device, non_blocking=True), tgt["image"].to(run.device, non_blocking=True)])
    y_s = src["label"].to(run.device, non_blocking=True).long()
    logits, features = forward(run, run.net, images)
    up = F.interpolate(logits, size=y_s.shape[-2:], mode="bilinear", align_corners=False)
    up_t, y_f = up[b:], tgt["static"].to(run.device, non_blocking=True).long()
    target_labels = run.target_ce if target_labels is None else target_labels
    want = run.args.signals or target_labels is not None  # the cosines behind y_D, handed out by the orchestrator
    y_in = y_f if run.teacher is None else rectified_labels(run, tgt["image"], features[b:], y_f)
    out = run.contrast(features[:b], y_s, features[b:], y_in, return_similarities=want, class_weight=class_weight)
    sims = signals.Similarities.from_output(out) if want else None
    y_t = out.target_labels if target_labels is None else target_labels(out, y_f, up_t.detach(), sims)
    y_d = out.dynamic_labels if run.teacher is None else y_in  # --rectify: the rectified labels in their place
    ce_src, ce_tgt = safe_cross_entropy(up[:b], y_s), safe_cross_entropy(up_t, y_t, class_weight)
    ent = protocl.entropy_loss(up[:b]) + 0.3 * protocl.entropy_loss(up_t)
    optimize(run, ce_src + 0.3 * ce_tgt + 0.4 * ent + out.loss)
    labels = {"static": y_f, "dynamic": y_d, "hybrid": y_t}
    stats = {"ce_src": ce_src.detach(), "ce_tgt": ce_tgt.detach(), "ent": ent.detach(), "fcl": out.fcl.detach(),
             "bcl": out.bcl.detach()}
    for name, y in labels.items():
        stats[f"cov_{name}"] = torch.count_nonzero(y != IGNORE_INDEX) * (100.0 / y.numel())
    if run.args.signals:
        stats["signal_counts"] = signals.step_counts(y_f, y_d, y_t, signals.prediction(up_t), sims,
                                                     run.contrast.threshold, run.contrast.num_classes)
    return stats, labels


@torch.no_grad()
def rectified_labels(run: Run, images: Tensor, features: Tensor, y_f: Tensor) -> Tensor:
    """``--rectify``: the round's static-label model's probabilities (``run.teacher``) at the labels' size, weighted
    by the target EMA prototypes' softmax (:func:`uda.reliability.rectify`)."""
    logits = F.interpolate(forward(run, run.teacher, images)[0], size=y_f.shape[-2:], mode="bilinear",
                           align_corners=False)
    ema = run.contrast.target_ema
    weights = reliability.prototype_weights(features.detach(), ema.prototypes, ema.initialized, run.args.temperature)
    return reliability.rectify(logits.softmax(1), weights, y_f, run.contrast.threshold)


def end_iteration(run: Run, state: dict, total: int, sums: dict[str, Tensor], kind: str | None = None) -> None:
    """After a step: :func:`uda.state.end_iteration` (with ``--stage1-best-on-target-val``, stage 1's periodic
    checkpoints keep the best model on target val first)."""
    best = state["phase"] == "source" and run.args.stage1_best_on_target_val
    state_end_iteration(run, state, total, sums, kind, before_save=(lambda: keep_if_best(run, state)) if best else None)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group's lr to ``base_lr * factor`` (the classifier group has a 10x base)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


# ---------------------------------------------------------------------------------------------- stage 1
def train_source(run: Run, state: dict, *, until: int | None = None, step_context: StepContext | None = None
                 ) -> None:
    """Stage 1 from ``state["iteration"]`` to ``until`` (default ``--source-iters``), poly lr."""
    a, sums, first = run.args, {}, True
    while state["iteration"] < min(until or a.source_iters, a.source_iters):
        set_lr(run.optimizer, (1 - state["iteration"] / a.source_iters) ** 0.9)
        src = next_batch(run, state, run.source_stream)
        with runtime.step_scope(run.args, run.device, "source", first, step_context):
            stats = source_step(run, src)
            accumulate(sums, stats)
            watch(run, state, stats)
        first = False
        end_iteration(run, state, a.source_iters, sums)


def end_source(run: Run, state: dict) -> None:
    """After stage 1: ``source_only.pt`` (the last weights, or the best on target val when asked), its
    evaluation, then stage 2 begins."""
    if run.args.stage1_best_on_target_val:
        keep_if_best(run, state)
        best = checkpoint.load(run.out / "source_best.pt", "source_best.pt")
        run.model.load_state_dict(best["model"])
        run.log(f"stage 1: using the checkpoint of iteration {best['iteration']} (best target-val mIoU "
                f"{best['miou']:.2f}; this selection reads target labels)")
    check_finite(run, state)
    save_model(run, "source_only.pt")
    state["metrics"]["source_only"] = evaluate(run, state, "source-only (stage 1, last checkpoint)")
    begin_phase(run, state, "adapt")


def keep_if_best(run: Run, state: dict) -> None:
    """``--stage1-best-on-target-val``: keep the stage-1 weights with the best target-val mIoU."""
    result = evaluate(run, state, f"stage 1 it {state['iteration']} (checkpoint selection on target val)")
    if result["miou"] > state["metrics"].get("stage1_best_miou", -1.0):
        state["metrics"]["stage1_best_miou"] = result["miou"]
        save_model(run, "source_best.pt", iteration=state["iteration"], miou=result["miou"])


# ---------------------------------------------------------------------------------------------- stage 2
def adapt_round(run: Run, state: dict, *, step: Callable = adapt_step, until: int | None = None,
                step_context: StepContext | None = None) -> None:
    """One round of stage 2 on the static labels of :func:`make_static_labels`, from ``state["iteration"]`` to
    ``until`` (default: the round's end, then its evaluation, reports and a checkpoint). ``step(run, src, tgt)``
    is the training step (default :func:`adapt_step`; studies pass their own)."""
    a, sums, first, last = run.args, {}, True, None
    if decisions.enabled(run) and state["iteration"] == 0:  # --round-decisions: the round's start is kept
        decisions.begin_round(run, state)  # (the first time, the source model is scored)
    if run.teacher is not None and state["iteration"] == 0:  # --rectify: the static labels' model, frozen
        reliability.set_teacher(run.teacher, run.model)
    while state["iteration"] < min(until or a.round_iters, a.round_iters):
        set_lr(run.optimizer, 0.5 ** state["round"] * (1 - state["iteration"] / a.round_iters) ** 0.9)
        src, tgt = next_batch(run, state, run.source_stream), next_batch(run, state, run.target_stream)
        with runtime.step_scope(run.args, run.device, "adapt", first, step_context):
            w = reliability.class_weights(state["signal_counts"], run.world) if a.reliability_weight else None
            stats, labels = step(run, src, tgt, **({} if w is None else {"class_weight": w}))  # the round so far
            if "signal_counts" in stats:  # the round's sums (uda.signals), not a mean of the log point
                state["signal_counts"] += stats.pop("signal_counts")
            accumulate(sums, stats)
            watch(run, state, stats)
            if a.diagnostics and labels is not None:  # opt-in: target ground truth, never trained on
                gt = tgt["label"].to(run.device, non_blocking=True).long()
                for i, kind in enumerate(diagnostics.LABEL_KINDS):
                    state["label_counts"][i] += diagnostics.class_counts(labels[kind], gt, run.num_classes)
        first, last = False, (None if labels is None else (tgt, labels))
        end_iteration(run, state, a.round_iters, sums)
    if state["iteration"] < a.round_iters:
        return
    result = evaluate(run, state, f"adapted round {state['round']}")
    end_round(run, state, result, last)
    if decisions.enabled(run) and not decisions.decide(run, state):  # undone: source-only steps next (train)
        state["iteration"] = 0
        save(run, state)
        return
    state["round"], state["iteration"] = state["round"] + 1, 0
    close_round(run, state, result, "adapted")


def close_round(run: Run, state: dict, result: dict, name: str) -> None:
    """After a round (its counter moved on): the checkpoint, or after the last one its evaluation as the phase's
    result, ``metrics[name]`` (the phase's end writes the checkpoint)."""
    if state["round"] < run.args.rounds:
        save(run, state)
    else:
        state["metrics"][name] = result


# ---------------------------------------------------------------------------------------------- the control
def source_round(run: Run, state: dict, kind: str, step_context: StepContext | None = None,
                 step: Callable | None = None) -> dict:
    """A round's budget as source-only steps with the round's schedule (lr halved each round, poly within), from
    ``state["iteration"]``, then its evaluation; the round counter moves on. ``kind``: "control" (the
    same-budget control) or "fallback" (a round undone by ``--round-decisions``). ``step(run, src, tgt)``: an
    adaptation step instead (``--fallback static`` / ``drop-flagged``). Returns the evaluation."""
    a, sums, first = run.args, {}, True
    while state["iteration"] < a.round_iters:
        set_lr(run.optimizer, 0.5 ** state["round"] * (1 - state["iteration"] / a.round_iters) ** 0.9)
        src = next_batch(run, state, run.source_stream)
        with runtime.step_scope(run.args, run.device, kind, first, step_context):
            if step is None:  # no target batch
                stats = source_step(run, src)
            else:  # the fallback's signals are not the round's: left out
                stats = step(run, src, next_batch(run, state, run.target_stream))[0]
                stats.pop("signal_counts", None)
            accumulate(sums, stats)
            watch(run, state, stats)
        first = False
        end_iteration(run, state, a.round_iters, sums, kind)
    result = evaluate(run, state, f"{kind} round {state['round']}")
    state["round"], state["iteration"] = state["round"] + 1, 0
    return result


def train_control(run: Run, state: dict, *, step_context: StepContext | None = None) -> None:
    """``--control``: source-only training from ``source_only.pt`` for stage 2's budget and schedule (rounds of
    ``--round-iters``, lr halved each round): what the adapted model must beat (docs/examples.md); with round
    decisions, selected by the same rule."""
    on = decisions.enabled(run)  # --round-decisions: the control is scored at the same points, its best delivered
    if on and state["round"] == state["iteration"] == 0:
        decisions.begin_control(run, state)
    while state["round"] < run.args.rounds:
        result = source_round(run, state, "control", step_context)
        if on:
            decisions.control_point(run, state, result)
        close_round(run, state, result, "source_only_continued")
    if on and decisions.deliver(run, state, state["decisions"]["control"]):
        m = state["metrics"]
        m["control_last"], m["source_only_continued"] = m["source_only_continued"], evaluate(
            run, state, "control (the best-scored model)", delivered=state["decisions"]["control"])


def fallback_round(run: Run, state: dict, step_context: StepContext | None = None) -> None:
    """``--round-decisions score``: the budget of a round that was undone, spent again from its start: source-only
    steps (``--fallback source``), or its static labels only / its target terms without its flagged classes
    (:func:`uda.decisions.fallback_terms`)."""
    if run.args.fallback == "source":
        result = source_round(run, state, "fallback", step_context)
    else:
        make_static_labels(run, state["round"])  # the round's own, on disk (made by the start just restored)
        with decisions.fallback_terms(run, state) as extra:
            result = source_round(run, state, "fallback", step_context, functools.partial(adapt_step, **extra))
    decisions.end_fallback(run, state, result["miou"])
    state["fallback"] = False
    close_round(run, state, result, "adapted")


def train(run: Run, state: dict, *, step: Callable = adapt_step, step_context: StepContext | None = None) -> None:
    """Both stages (and the same-budget control with ``--control``) from wherever ``state`` is."""
    if state["phase"] == "source":
        train_source(run, state, step_context=step_context)
        end_source(run, state)
    while state["phase"] == "adapt" and state["round"] < run.args.rounds:
        if state["fallback"]:  # --round-decisions: the round was undone
            fallback_round(run, state, step_context)
            continue
        state["thresholds"] = make_static_labels(run, state["round"])
        adapt_round(run, state, step=step, step_context=step_context)
    if state["phase"] == "adapt":
        if decisions.enabled(run) and decisions.deliver(run, state):  # the best-scored model, not the last
            m = state["metrics"]
            m["adapted_last"], m["adapted"] = m["adapted"], evaluate(run, state, "adapted (the best-scored model)",
                                                                     delivered=state["decisions"])
        check_finite(run, state)
        save_model(run, "adapted.pt")
        begin_phase(run, state, "control" if run.args.control else "done")
    if state["phase"] == "control":
        train_control(run, state, step_context=step_context)
        begin_phase(run, state, "done")


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, parse_args, start, train)


if __name__ == "__main__":
    sys.exit(main())
