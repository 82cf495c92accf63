r"""DAFormer-class self-training on protocl's pipeline: SegFormer's MiT + DAFormer's decoder, trained with
DAFormer's mean-teacher recipe on current PyTorch, without mmcv (issue 32; docs/daformer.md).

A script to read and copy, in the order a run calls it: :func:`main` -> :func:`setup` -> :func:`start` (new or
resumed) -> :func:`train_teacher` (``--iters`` steps of :func:`teacher_step`) -> :func:`train_control` (the same
network on source alone, same iterations, same initial weights: the source-only number) -> :func:`finish`. The
rest is the package ``uda/`` shared with ``train_gta2cs.py`` (data, checkpoints, resume, preemption, the
non-finite guard, torchrun, reports) and its recipe modules: :mod:`uda.teacher`, :mod:`uda.mix`,
:mod:`uda.rare_class`, :mod:`uda.schedule`, :mod:`uda.mean_teacher`.

Without dataset paths it runs the embedded demo (MiT-B0 from scratch on 64x64 crops, a few minutes on a CPU);
with them, MiT-B5 and DAFormer's settings:

    python examples/train_daformer.py
    python examples/train_daformer.py --gta5-root /data/GTA5 --cityscapes-root /data/cityscapes \
        --init mit_b5.pth --out runs/daformer --device cuda --amp bf16
    torchrun --nproc_per_node=4 examples/train_daformer.py ... (the same arguments)

One step (DAFormer's ``DACS.forward_train``): the teacher follows the student (EMA, alpha_t = min(1 - 1/(t+1),
0.999)); the source crops train the student (cross-entropy, plus the ImageNet feature distance on the thing
classes with ``--init``); the teacher labels the target crops (arg max; weight = the batch's share of pixels at
least 0.968 confident, 0 on the top and bottom rows); ClassMix pastes half of each source crop's classes onto a
target crop, colour jitter and blur follow; the student trains on the mixed crops against the mixed labels
(optionally MIC's masked target crops against the teacher's labels). Two backward passes (three with MIC), one
AdamW step; no host synchronisation. The last line printed is ``target mIoU: source-only X.XX -> adapted Y.YY (...)``.

``--contrast`` (issue 33; docs/daformer.md, "protocl's contrast on this trainer") adds protocl's
``BidirectionalContrast`` from ``--contrast-start`` on: the student's source features against the target features
of the mixed image (or of an extra pass on the clean target crop), the teacher's confident labels mixed as the
image is as static labels (:func:`static_labels`, :func:`contrast_terms`); the source graph is kept and every
term goes into one backward.
"""

from __future__ import annotations

import sys

import protocl
import torch
from torch import Tensor
from uda import mean_teacher, mix, runtime, schedule, teacher
from uda.daformer_options import parse_args
from uda.report import evaluate, finish
from uda.run import Run, autocast, forward, setup
from uda.state import accumulate, begin_phase, check_finite, end_iteration, next_batch, run_script, save_model, watch
from uda.state import start as start_state

__all__ = ["main", "setup", "start", "train", "train_teacher", "teacher_step", "teacher_labels", "static_labels",
           "contrast_terms", "source_step", "source_loss", "source_terms", "train_control", "finish"]

RAW = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # the jitter works on the crops' 0..255 RGB values


def start(run: Run) -> dict:
    """The run's state (:func:`uda.state.start`: new, or resumed exactly from ``--resume``). A new run has no
    stage 1: the initial weights are kept as ``initial.pt`` (the control starts from them) and training begins."""
    state = start_state(run)
    if state["phase"] == "source":
        save_model(run, "initial.pt")
        begin_phase(run, state, "adapt")
    return state


def schedule_lr(run: Run, iteration: int) -> None:
    """DAFormer's lr at ``iteration``: linear warm-up, then poly 1.0 (every group: its ``base_lr`` x the factor)."""
    a = run.args
    schedule.set_lr_(run.optimizer, iteration, max_iters=a.iters, warmup_iters=min(a.warmup_iters, a.iters))


def backward(run: Run, loss: Tensor) -> None:
    run.scaler.scale(loss).backward()


def step_optimizer(run: Run) -> None:
    run.scaler.step(run.optimizer)
    run.scaler.update()


# ---------------------------------------------------------------------------------------------- one step
def source_loss(run: Run, x_s: Tensor, y_s: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The source crops' loss, not yet backward: the cross-entropy and, with an ImageNet encoder
    (``--fd-lambda``), the feature distance on the thing classes; returns ``(loss, features, stats)``."""
    a = run.args
    if run.imnet is None:
        logits, features = forward(run, run.net, x_s)[:2]
        ce = mean_teacher.pixel_mean_ce(logits, y_s)
        return ce, features, {"ce_src": ce.detach()}
    logits, features, last = forward(run, run.net, x_s, encoder=True)
    with torch.no_grad(), autocast(run):
        frozen = run.imnet(run.model.normalize(x_s))[-1]
    fd = a.fd_lambda * teacher.feature_distance_loss(last.float(), frozen.float(), y_s, run.things,
                                                     scale_min_ratio=a.fd_scale_min_ratio,
                                                     num_classes=run.num_classes)
    ce = mean_teacher.pixel_mean_ce(logits, y_s)
    return ce + fd, features, {"ce_src": ce.detach(), "fd": fd.detach()}


def source_terms(run: Run, x_s: Tensor, y_s: Tensor) -> dict[str, Tensor]:
    """:func:`source_loss`, backward at once (DAFormer frees the source graph before the target's)."""
    loss, _, stats = source_loss(run, x_s, y_s)
    backward(run, loss)
    return stats


@torch.no_grad()
def teacher_labels(run: Run, x_t: Tensor, *, static: bool = False) -> tuple[Tensor, Tensor, Tensor | None]:
    """The teacher's pseudo labels of the target crops at crop resolution, their weight (on the device; 1 with
    ``--no-pseudo-weight``) and, with ``static``, the contrast's static labels (:func:`static_labels`; else
    None)."""
    a = run.args
    logits = forward(run, teacher.teacher_mode_(run.teacher), x_t)[0]
    logits = torch.nn.functional.interpolate(logits, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
    y_t, w_t = teacher.pseudo_labels(logits, threshold=a.pseudo_threshold, ignore_top=a.ignore_rows[0],
                                     ignore_bottom=a.ignore_rows[1])
    return y_t, torch.ones_like(w_t) if a.no_pseudo_weight else w_t, static_labels(run, logits) if static else None


def static_labels(run: Run, logits: Tensor) -> Tensor:
    """The contrast's static labels: the teacher's arg max where it is confident, ``ignore_index`` elsewhere and on
    the ``--ignore-rows``. Confident (``--contrast-labels``): at least ``--pseudo-threshold`` (the recipe's 0.968),
    or protocl's class-balanced thresholds of this batch's teacher confidences plus each image's top
    ``--proportion`` (:func:`protocl.static_pseudo_label`)."""
    a = run.args
    if a.contrast_labels == "recipe":
        confidence, labels = logits.float().softmax(1).max(1)
        labels = torch.where(confidence >= a.pseudo_threshold, labels, protocl.IGNORE_INDEX)
    else:
        thresholds = run.thresholds
        thresholds.reset()
        thresholds.update(logits)
        labels = protocl.static_pseudo_label(logits, class_thresholds=thresholds.compute(), proportion=a.proportion)
    kept = teacher.kept_rows(labels.shape[-2], *a.ignore_rows, labels.device)
    return torch.where(kept[:, None], labels, protocl.IGNORE_INDEX)


def teacher_step(run: Run, state: dict, src: dict, tgt: dict) -> dict[str, Tensor]:
    """One step of the recipe on a source and a target batch, with ``--contrast`` from ``--contrast-start`` on
    (one backward of every term, :func:`contrast_terms`); returns its statistics (device tensors, read at the log
    point)."""
    a, dev = run.args, run.device
    teacher.ema_update_(run.teacher, run.model, state["iteration"], a.teacher_alpha)  # DAFormer: first
    host, gen = mean_teacher.step_generators(a.seed, run.rank, state["step"], dev)
    x_s = src["image"].to(dev, non_blocking=True).float()
    y_s = src["label"].to(dev, non_blocking=True).long()
    x_t = tgt["image"].to(dev, non_blocking=True).float()
    run.optimizer.zero_grad(set_to_none=True)
    joint = run.contrast is not None and state["iteration"] >= a.contrast_start  # host integers: no sync
    if joint:  # the source graph is kept for FCL/BCL: one backward at the end
        loss_s, f_s, stats = source_loss(run, x_s, y_s)
    else:
        stats = source_terms(run, x_s, y_s)
    y_t, w_t, s_t = teacher_labels(run, x_t, static=joint)
    x_m, y_m, w_m, masks = x_t, y_t, w_t, None
    if not a.no_mix:  # ClassMix: half of each source crop's classes pasted on a target crop
        masks = mix.class_mix_masks(y_s, generator=gen)
        x_m, y_m, w_m = mix.mix(masks, x_s, x_t), mix.mix(masks, y_s, y_t), mix.mix(masks, torch.ones_like(w_t), w_t)
    strong = {"color_jitter_strength": a.jitter, "color_jitter_p": a.jitter_p if a.jitter > 0 else 1.0,
              "blur": not a.no_blur, "rng": host, **RAW}
    logits_m, f_m = forward(run, run.net, mix.strong_transform(x_m, **strong))[:2]
    if joint:
        extra, y_m = contrast_terms(run, x_t, y_s, y_t, s_t, masks, f_s, f_m, y_m)
        ce_mix = mean_teacher.pixel_mean_ce(logits_m, y_m, w_m)
        backward(run, loss_s + ce_mix + extra["loss"])
        stats.update(fcl=extra["fcl"], bcl=extra["bcl"])
    else:
        ce_mix = mean_teacher.pixel_mean_ce(logits_m, y_m, w_m)
        backward(run, ce_mix)
        if run.contrast is not None:  # before --contrast-start: logged as 0
            stats.update(fcl=torch.zeros((), device=dev), bcl=torch.zeros((), device=dev))
    stats.update(ce_mix=ce_mix.detach(), pl_weight=w_t.amax())
    if a.mic:  # MIC: the target crops, strongly augmented and block-masked, against the teacher's labels
        keep = teacher.block_mask(x_t.shape[0], *x_t.shape[-2:], block=a.mic_block, ratio=a.mic_ratio,
                                  generator=gen, device=dev)
        masked = mix.mix(keep, mix.strong_transform(x_t, **strong), blank(run, x_t))  # masked: the mean colour
        mic = a.mic_weight * mean_teacher.pixel_mean_ce(forward(run, run.net, masked)[0], y_t, w_t)
        backward(run, mic)
        stats["mic"] = mic.detach()
    step_optimizer(run)
    return stats


def contrast_terms(run: Run, x_t: Tensor, y_s: Tensor, y_t: Tensor, s_t: Tensor, masks: Tensor | None,
                   f_s: Tensor, f_m: Tensor, y_m: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """``--contrast``: protocl's :class:`~protocl.BidirectionalContrast` on the student's source features
    ``f_s`` (ground truth ``y_s``) and target features: those of the mixed image ``f_m`` with the static labels
    mixed as the image is (``--contrast-target mixed``), or an extra student pass on the clean target crops with
    their own static labels ``s_t`` (``clean``). Returns ``({"loss", "fcl", "bcl"}, labels of the target CE)``: the
    mixed labels ``y_m``, or with ``--hybrid-ce`` the hybrid labels where they label a pixel (the teacher's arg
    max elsewhere; the weights stay the recipe's)."""
    a, ignore = run.args, protocl.IGNORE_INDEX
    s_m = s_t if masks is None else mix.mix(masks, y_s, s_t)
    f_t, static = (f_m, s_m) if a.contrast_target == "mixed" else (forward(run, run.net, x_t)[1], s_t)
    out = run.contrast(f_s.float(), y_s, f_t.float(), static)  # fp32 losses under autocast
    if a.hybrid_ce:
        hybrid = out.target_labels
        if a.contrast_target == "mixed":
            y_m = torch.where(hybrid != ignore, hybrid, y_m)
        else:
            y_c = torch.where(hybrid != ignore, hybrid, y_t)
            y_m = y_c if masks is None else mix.mix(masks, y_s, y_c)
    return {"loss": out.loss, "fcl": out.fcl.detach(), "bcl": out.bcl.detach()}, y_m


def blank(run: Run, images: Tensor) -> Tensor:
    """Images of the network's mean colour (in the input's channel order): what MIC's masked patches show (MIC
    masks normalised images with zeros)."""
    mean = run.model.pixel_mean.flip(1) if run.model.bgr else run.model.pixel_mean
    return mean.to(images.dtype).expand_as(images)


def source_step(run: Run, state: dict, src: dict, tgt: dict | None = None) -> dict[str, Tensor]:
    """One step of the same-budget control: the source terms only (the student on source alone)."""
    run.optimizer.zero_grad(set_to_none=True)
    stats = source_terms(run, src["image"].to(run.device, non_blocking=True).float(),
                         src["label"].to(run.device, non_blocking=True).long())
    step_optimizer(run)
    return stats


# ---------------------------------------------------------------------------------------------- the loops
def steps(run: Run, state: dict, kind: str, step, step_context=None) -> None:
    """``--iters`` steps from ``state["iteration"]``: DAFormer's lr, the batches (the target's only for the mean
    teacher), ``step(run, state, src, tgt)``, the reliability points and the log (``kind``: "teacher" or
    "control")."""
    a, sums, first = run.args, {}, True
    while state["iteration"] < a.iters:
        schedule_lr(run, state["iteration"])
        src = next_batch(run, state, run.source_stream)
        tgt = next_batch(run, state, run.target_stream) if kind == "teacher" else None
        with runtime.step_scope(a, run.device, kind, first, step_context):
            stats = step(run, state, src, tgt)
            accumulate(sums, stats)
            watch(run, state, stats)
        first = False
        end_iteration(run, state, a.iters, sums, kind)


def train_teacher(run: Run, state: dict, *, step=teacher_step, step_context=None) -> None:
    """``--iters`` steps of :func:`teacher_step`, then the student's evaluation (DAFormer evaluates the student)
    and ``adapted.pt``."""
    steps(run, state, "teacher", step, step_context)
    state["metrics"]["adapted"] = evaluate(run, state, f"adapted (mean teacher, {run.args.iters} iterations)")
    check_finite(run, state)
    save_model(run, "adapted.pt")
    begin_phase(run, state, "control" if run.args.control else "done")


def train_control(run: Run, state: dict, *, step_context=None) -> None:
    """``--control``: the same network from ``initial.pt`` on source alone, the same schedule, iterations and
    source batches: the source-only number of the last line, then ``source_only.pt``."""
    steps(run, state, "control", source_step, step_context)
    state["metrics"]["source_only"] = evaluate(run, state, f"source-only (same budget, {run.args.iters} iterations)")
    check_finite(run, state)
    save_model(run, "source_only.pt")
    begin_phase(run, state, "done")


def train(run: Run, state: dict, *, step=teacher_step, step_context=None) -> None:
    """The mean-teacher run and the same-budget control, from wherever ``state`` is."""
    if state["phase"] == "adapt":
        train_teacher(run, state, step=step, step_context=step_context)
    if state["phase"] == "control":
        train_control(run, state, step_context=step_context)


def main(argv: list[str] | None = None) -> int:
    return run_script(argv, parse_args, start, train)


if __name__ == "__main__":
    sys.exit(main())
