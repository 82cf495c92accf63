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
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor
from uda import mean_teacher, mix, runtime, schedule, teacher
from uda.daformer_options import parse_args
from uda.report import evaluate, finish
from uda.run import Run, autocast, forward, setup
from uda.state import accumulate, begin_phase, check_finite, end_iteration, next_batch, run_script, save_model, watch
from uda.state import start as start_state

__all__ = ["main", "setup", "start", "train", "train_teacher", "teacher_step", "teacher_labels", "source_step",
           "source_terms", "train_control", "finish"]

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
def source_terms(run: Run, x_s: Tensor, y_s: Tensor) -> dict[str, Tensor]:
    """The source crops' terms, backward at once (DAFormer frees the source graph before the target's): the
    cross-entropy and, with an ImageNet encoder (``--fd-lambda``), the feature distance on the thing classes."""
    a = run.args
    if run.imnet is None:
        logits = forward(run, run.net, x_s)[0]
        ce = mean_teacher.pixel_mean_ce(logits, y_s)
        backward(run, ce)
        return {"ce_src": ce.detach()}
    logits, _, last = forward(run, run.net, x_s, encoder=True)
    with torch.no_grad(), autocast(run):
        frozen = run.imnet(run.model.normalize(x_s))[-1]
    fd = a.fd_lambda * teacher.feature_distance_loss(last.float(), frozen.float(), y_s, run.things,
                                                     scale_min_ratio=a.fd_scale_min_ratio,
                                                     num_classes=run.num_classes)
    ce = mean_teacher.pixel_mean_ce(logits, y_s)
    backward(run, ce + fd)
    return {"ce_src": ce.detach(), "fd": fd.detach()}


@torch.no_grad()
def teacher_labels(run: Run, x_t: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's pseudo labels of the target crops at crop resolution and their weight (on the device; 1 with
    ``--no-pseudo-weight``)."""
    a = run.args
    logits = forward(run, teacher.teacher_mode_(run.teacher), x_t)[0]
    logits = torch.nn.functional.interpolate(logits, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
    y_t, w_t = teacher.pseudo_labels(logits, threshold=a.pseudo_threshold, ignore_top=a.ignore_rows[0],
                                     ignore_bottom=a.ignore_rows[1])
    return y_t, torch.ones_like(w_t) if a.no_pseudo_weight else w_t


def teacher_step(run: Run, state: dict, src: dict, tgt: dict) -> dict[str, Tensor]:
    """One step of the recipe on a source and a target batch; returns its statistics (device tensors, read at
    the log point)."""
    a, dev = run.args, run.device
    teacher.ema_update_(run.teacher, run.model, state["iteration"], a.teacher_alpha)  # DAFormer: first
    host, gen = mean_teacher.step_generators(a.seed, run.rank, state["step"], dev)
    x_s = src["image"].to(dev, non_blocking=True).float()
    y_s = src["label"].to(dev, non_blocking=True).long()
    x_t = tgt["image"].to(dev, non_blocking=True).float()
    run.optimizer.zero_grad(set_to_none=True)
    stats = source_terms(run, x_s, y_s)
    y_t, w_t = teacher_labels(run, x_t)
    x_m, y_m, w_m = x_t, y_t, w_t
    if not a.no_mix:  # ClassMix: half of each source crop's classes pasted on a target crop
        masks = mix.class_mix_masks(y_s, generator=gen)
        x_m, y_m, w_m = mix.mix(masks, x_s, x_t), mix.mix(masks, y_s, y_t), mix.mix(masks, torch.ones_like(w_t), w_t)
    strong = {"color_jitter_strength": a.jitter, "color_jitter_p": a.jitter_p if a.jitter > 0 else 1.0,
              "blur": not a.no_blur, "rng": host, **RAW}
    ce_mix = mean_teacher.pixel_mean_ce(forward(run, run.net, mix.strong_transform(x_m, **strong))[0], y_m, w_m)
    backward(run, ce_mix)
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
