r"""GTA5 (or SYNTHIA) -> Cityscapes with bi-directional prototype contrast (protocl's reference pipeline, spec §4).

A script to read and copy: plain functions on protocl's public API, in the order a run calls them
(``setup`` -> ``start`` -> ``train`` = ``train_source`` -> ``end_source`` -> per round ``make_static_labels`` +
``adapt_round`` (whose step is ``adapt_step``) -> ``finish``). Data, model, evaluation, figures and
checkpoint files are modules of ``uda/``; everything a restart needs is one checkpoint dict
(:func:`save_checkpoint`).

Without dataset paths it runs the embedded demo: a small synthetic two-domain dataset is written in the
GTA5 (or, with ``--source synthia``, SYNTHIA) and Cityscapes layouts (flat rendering -> textured, noisy,
colour-shifted "real" images), a tiny CNN is trained source-only, then adapted, in a few minutes on a CPU:

    python examples/train_gta2cs.py
    python examples/train_gta2cs.py --source synthia --amp bf16

On the real datasets (DeepLab-V2 ResNet-101, the paper's settings are the defaults):

    python examples/train_gta2cs.py --gta5-root /data/GTA5 --cityscapes-root /data/cityscapes \
        --init resnet101-imagenet.pth --out runs/gta2cs --device cuda --amp bf16
    python examples/train_gta2cs.py --synthia-root /data/RAND_CITYSCAPES --cityscapes-root /data/cityscapes ...
    torchrun --nproc_per_node=4 examples/train_gta2cs.py ... (the same arguments)

Other benchmarks and your own data (docs/datasets.md): ``--source {gta5,synthia,cityscapes,folder}``,
``--target {cityscapes,acdc,darkzurich,folder}``, ``--class-table`` for your own K classes; without roots,
``--source cityscapes --target acdc`` (or ``darkzurich``) and ``--source folder --target folder`` (K = 5) run on
generated data in those layouts:

    python examples/train_gta2cs.py --source cityscapes --cityscapes-root /data/cityscapes --target acdc \
        --acdc-root /data/acdc --init resnet101-imagenet.pth --out runs/cs2acdc --device cuda
    python examples/train_gta2cs.py --source folder --source-root /data/mine/src --target folder \
        --target-root /data/mine/tgt --class-table /data/mine/classes.json ...

Stage 1 trains on labelled source crops (cross-entropy) and keeps the last weights. Stage 2 adapts in rounds:
at the start of each round static pseudo labels are regenerated over the target train split and written to
disk; every step the orchestrator :class:`protocl.BidirectionalContrast` turns them into hybrid labels y_T and
returns the FCL + BCL loss; the step loss (:func:`adapt_step`) is

    CE(source) + 0.3·CE(target, y_T) + 0.4·(H(source) + 0.3·H(target)) + λ_FCL·FCL + λ_BCL·BCL.

The training step never synchronises with the host: batches come from page-locked memory with non-blocking
copies, losses and statistics are accumulated on the device and read only at the log point (every
``--log-every`` steps, :func:`log_point`), and protocl's value checks (a pass per label map, device-side on CUDA) run on the
first step of each stage and round only (``--value-checks always`` keeps them on). ``--sync-debug`` runs every
other step under ``torch.cuda.set_sync_debug_mode("error")``, so that any sync raises.

A day-long run on a shared cluster (docs/reproduce.md, "Long runs"): every file is loaded with
``torch.load(weights_only=True)``; a pre-flight check reads every image and label before training
(``--no-check-data`` skips it); a bad file met during training stops the run with its path, or is skipped
(``--on-bad-sample skip``, counted in metrics.json); SIGTERM/SIGUSR1 finish the step, write the checkpoint and
exit with status 75, and ``--resume auto`` continues from ``<out>/checkpoint.pt``; a non-finite loss or
gradient (:class:`uda.runtime.NonFiniteGuard`, read at the log point) stops the run without overwriting the
last good checkpoint; the output folder is checked before training.

The last line printed is ``target mIoU: source-only X.XX -> adapted Y.YY`` (for SYNTHIA: over the 16 shared
classes; metrics.json also has ``miou13``). See docs/examples.md.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from uda import checkpoint, diagnostics, dist, runtime, signals
from uda.data import BadSampleError, PseudoLabelSet, ignore_stop_signals, skip_records
from uda.evaluate import evaluate as evaluate_model
from uda.options import parse_args
from uda.run import (
    AMP_DTYPES,
    Run,
    bad_samples,
    finish,
    new_optimizer,
    round_diagnostics,
    round_figure,
    scalars,
    setup,
)
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

import protocl
from protocl import IGNORE_INDEX
from protocl.distributed import all_reduce_sum_

__all__ = [  # the loop, in the order a run calls it (Run, setup and finish come from uda.run)
    "Run", "setup", "start", "new_state", "save_checkpoint", "train", "train_source", "end_source",
    "make_static_labels", "adapt_round", "adapt_step", "source_step", "evaluate", "log_point", "finish", "main",
]

StepContext = Callable[[str, bool], contextlib.AbstractContextManager]  # (kind, checked) -> context manager


# ---------------------------------------------------------------------------------------------- the checkpoint dict
def new_state(run: Run) -> dict:
    """The state that survives a restart, besides the modules' own: phase ("source", "adapt", "control",
    "done"), round and iteration within the phase, ``step`` (iterations since the start of stage 1, the x axis of
    logs and curves), results so far and this round's per-class label counts (``--diagnostics``)."""
    return {"phase": "source", "round": 0, "iteration": 0, "step": 0, "thresholds": None, "metrics": {},
            "bad_samples": {"skipped": 0, "files": []},  # --on-bad-sample skip: this rank's skips
            "history": {"eval_iter": [], "eval_miou": [], "log_iter": [], "coverage_static": [],
                        "coverage_dynamic": [], "coverage_hybrid": []},
            "label_counts": torch.zeros(3, 4, run.num_classes, dtype=torch.int64, device=run.device),
            "signal_counts": signals.zeros(run.contrast.num_classes, run.device)}  # this round's (uda.signals)


def save_checkpoint(run: Run, state: dict, name: str = "checkpoint.pt") -> None:
    """Write the ONE checkpoint dict (rank 0, atomically; every rank calls it: it sums the label counts).

    Never a non-finite state: the non-finite guard is read first (:func:`check_finite`), so a diverged run
    stops with the last good checkpoint on disk."""
    check_finite(run, state)
    counts = all_reduce_sum_(state["label_counts"].clone())
    skipped = bad_samples(run, state)
    signal_counts = all_reduce_sum_(state["signal_counts"].clone())  # a collective: every rank sums
    if run.rank == 0:
        checkpoint.save_atomic({
            **state, "label_counts": counts.cpu(), "bad_samples": skipped, "model": run.model.state_dict(),
            "signal_counts": signal_counts.cpu(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "contrast": run.contrast.state_dict(), "rng": checkpoint.rng_state(), "config": run.config,
            "streams": {"source": run.source_stream.state_dict(), "target": run.target_stream.state_dict()},
            "world_size": run.world}, run.out / name)
    dist.barrier()


def check_finite(run: Run, state: dict) -> None:
    """Raise :class:`uda.runtime.NonFiniteError` if a loss term or the gradients went non-finite since the
    start (a collective under torch.distributed: every rank calls it, at log points and before every save)."""
    if run.guard is not None:
        run.guard.check(state["step"])


def start(run: Run) -> dict:
    """The run's state: new, resumed from ``--resume`` (exactly; ``auto``: ``<out>/checkpoint.pt`` if it exists),
    or at stage 2 from ``--source-checkpoint``."""
    a, state = run.args, new_state(run)
    resume = runtime.resolve_resume(a.resume, run.out)
    if a.resume == "auto" and resume is None:
        run.log(f"--resume auto: no {run.out / 'checkpoint.pt'} yet, starting from the beginning")
    if resume is not None:
        ckpt = checkpoint.load(resume, "--resume")
        state.update({k: ckpt[k] for k in ("phase", "round", "iteration", "step", "thresholds", "metrics",
                                           "history")})
        if run.rank == 0:  # the counts were summed over ranks when saved
            state["label_counts"].copy_(ckpt["label_counts"])
            state["bad_samples"] = ckpt.get("bad_samples", state["bad_samples"])
            if "signal_counts" in ckpt:
                state["signal_counts"].copy_(ckpt["signal_counts"])
        run.model.load_state_dict(ckpt["model"])
        if state["phase"] != "source":
            new_optimizer(run, a.lr)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
        elif run.scaler.is_enabled():
            run.log("note: the checkpoint has no fp16 GradScaler state (it was trained without --amp fp16): "
                    "starting a fresh scaler")
        run.contrast.load_state_dict(ckpt["contrast"])
        streams = ckpt["streams"]
        if ckpt.get("world_size", 1) != run.world:  # another world size shards differently: next epoch
            streams = {k: {"epoch": v["epoch"] + 1, "position": 0} for k, v in streams.items()}
            run.log(f"note: checkpoint from {ckpt.get('world_size')} ranks resumed on {run.world}: data streams "
                    "restart at the next epoch (model, optimizer, EMA, thresholds restored exactly)")
        run.source_stream.load_state_dict(streams["source"])
        run.target_stream.load_state_dict(streams["target"])
        checkpoint.set_rng_state(ckpt["rng"])
        run.log(f"resumed {resume}: {state['phase']}, round {state['round']}, iteration {state['iteration']}")
    elif a.source_checkpoint:
        load_source_model(run, a.source_checkpoint)
        state["step"] = a.source_iters
        state["metrics"]["source_only"] = evaluate(run, state, "source-only (loaded with --source-checkpoint)")
        begin_phase(run, state, "adapt")
    run.started = (time.time(), state["step"])
    if run.guard is not None:
        run.guard.window_start = state["step"] + 1
    return state


def load_source_model(run: Run, path: str) -> None:
    """``--source-checkpoint``: model weights of a ``source_only.pt`` / ``adapted.pt`` / ``checkpoint.pt``, copied
    to ``<out>/source_only.pt`` (the same-budget control starts from them)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"expected --source-checkpoint to be a checkpoint file, got {str(file)!r} (not a file)")
    ckpt = checkpoint.load(file, "--source-checkpoint")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"expected --source-checkpoint {str(file)!r} to hold {{'model': state_dict}}, got "
                         f"{type(ckpt).__name__} with keys {sorted(ckpt)[:5] if isinstance(ckpt, dict) else []}")
    try:
        run.model.load_state_dict(ckpt["model"])
    except RuntimeError as error:
        raise ValueError(f"expected --source-checkpoint {str(file)!r} to match --arch {run.args.arch}: {error}")
    bad = runtime.non_finite_tensors(ckpt["model"].items())
    if bad:
        raise ValueError(f"expected --source-checkpoint {str(file)!r} to hold finite weights, got NaN or inf in "
                         f"{len(bad)} tensor(s): {', '.join(bad[:5])}")
    if run.rank == 0:
        checkpoint.save_atomic({"model": run.model.state_dict(), "config": run.config, "from": str(file)},
                               run.out / "source_only.pt")
    dist.barrier()
    run.log(f"stage 1 skipped: source model loaded from {file}")


def begin_phase(run: Run, state: dict, phase: str) -> None:
    """Start stage 2 ("adapt") or the same-budget control ("control", from source_only.pt) or end ("done")."""
    if phase == "control":
        run.model.load_state_dict(checkpoint.load(run.out / "source_only.pt", "source_only.pt")["model"])
    state.update(phase=phase, round=0, iteration=0)
    if phase != "done":
        new_optimizer(run, run.args.lr)
    save_checkpoint(run, state)


# ---------------------------------------------------------------------------------------------- one step
def forward(run: Run, net: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """The network under autocast (``--amp``); logits back in fp32 for the losses (protocl's losses upcast the
    features themselves, so those stay in the autocast dtype)."""
    dtype = AMP_DTYPES[run.args.amp]
    with torch.autocast(run.device.type, dtype=dtype) if dtype else contextlib.nullcontext():
        logits, features = net(images.to(run.device, non_blocking=True))
    return logits.float(), features


def safe_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over non-ignored pixels; 0 (in the graph) when every pixel is ignored, never NaN."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (labels != IGNORE_INDEX).sum().clamp_min(1)


def optimize(run: Run, loss: Tensor) -> None:
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()


def source_step(run: Run, batch: dict) -> dict[str, Tensor]:
    """One stage-1 step: CE on the source crops."""
    labels = batch["label"].to(run.device, non_blocking=True).long()
    logits, _ = forward(run, run.net, batch["image"])
    loss = safe_cross_entropy(F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
                              labels)
    optimize(run, loss)
    return {"ce_src": loss.detach()}


def adapt_step(run: Run, src: dict, tgt: dict | None, *, target_labels: Callable | None = None
               ) -> tuple[dict[str, Tensor], dict[str, Tensor] | None]:
    """One stage-2 step on a source and a target batch; ``tgt=None`` is the source-only control step.

    Returns the step's statistics (device tensors, read at the log point) and the target labels it used
    (``static`` y_F, ``dynamic`` y_D, ``hybrid`` = what the target CE trained on). ``target_labels(out, y_f,
    target_logits, sims)`` (a study hook, default None) chooses the target CE's labels from the orchestrator's
    output ``out`` and the step's prototype cosines ``sims`` (:class:`uda.signals.Similarities`, the ones
    behind ``out.dynamic_labels``; default: ``run.target_ce``, the ``--target-ce`` rule, None for the paper's
    hybrid labels); FCL/BCL always use the orchestrator's own y_T. With ``--signals`` (default)
    the statistics hold ``signal_counts``, this step's sums for :mod:`uda.signals` (no host read).
    """
    b = src["image"].shape[0]
    images = src["image"].to(run.device, non_blocking=True)  # (page-locked on CUDA: copied one by one)
    if tgt is not None:
        images = torch.cat([images, tgt["image"].to(run.device, non_blocking=True)])
    y_s = src["label"].to(run.device, non_blocking=True).long()
    logits, features = forward(run, run.net, images)
    up = F.interpolate(logits, size=y_s.shape[-2:], mode="bilinear", align_corners=False)
    ce_src = safe_cross_entropy(up[:b], y_s)
    if tgt is None:  # source-only control with the same schedule: no target term at all
        optimize(run, ce_src)
        return {"ce_src": ce_src.detach()}, None
    up_t, y_f = up[b:], tgt["static"].to(run.device, non_blocking=True).long()
    target_labels = run.target_ce if target_labels is None else target_labels  # --target-ce (uda.target_ce)
    sims = None  # the cosines behind y_D, taken before the orchestrator moves its EMAs (label-free signals)
    if run.args.signals or target_labels is not None:
        sims = signals.similarities(run.contrast, features[:b], y_s, features[b:])
    out = run.contrast(features[:b], y_s, features[b:], y_f)  # FCL + BCL on y_T = hybrid(y_F, y_D)
    y_t = out.target_labels if target_labels is None else target_labels(out, y_f, up_t.detach(), sims)
    ce_tgt = safe_cross_entropy(up_t, y_t)
    ent = protocl.entropy_loss(up[:b]) + 0.3 * protocl.entropy_loss(up_t)
    loss = ce_src + 0.3 * ce_tgt + 0.4 * ent + out.loss
    optimize(run, loss)
    labels = {"static": y_f, "dynamic": out.dynamic_labels, "hybrid": y_t}
    stats = {"ce_src": ce_src.detach(), "ce_tgt": ce_tgt.detach(), "ent": ent.detach(), "fcl": out.fcl.detach(),
             "bcl": out.bcl.detach()}
    for name, y in labels.items():
        stats[f"cov_{name}"] = torch.count_nonzero(y != IGNORE_INDEX) * (100.0 / y.numel())
    if run.args.signals:
        stats["signal_counts"] = signals.step_counts(y_f, out.dynamic_labels, y_t, up_t.detach().argmax(1), sims,
                                                     run.contrast.threshold, run.contrast.num_classes)
    return stats, labels


@contextlib.contextmanager
def step_scope(run: Run, kind: str, checked: bool, step_context: StepContext | None):
    """Around one training step: protocl's value checks when ``checked``, ``--sync-debug`` on the other steps
    (CUDA), and the caller's ``step_context(kind, checked)`` (timing, tests). ``kind``: source/adapt/control."""
    protocl.set_value_checks(checked)
    debug = contextlib.nullcontext()
    if run.args.sync_debug and not checked and run.device.type == "cuda":
        debug = sync_debug_error()
    with debug, step_context(kind, checked) if step_context else contextlib.nullcontext():
        yield


@contextlib.contextmanager
def sync_debug_error():
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


# ---------------------------------------------------------------------------------------------- the loops
def train_source(run: Run, state: dict, *, until: int | None = None, step_context: StepContext | None = None
                 ) -> None:
    """Stage 1 from ``state["iteration"]`` to ``until`` (default ``--source-iters``), poly lr; checkpoints every
    ``--ckpt-every`` iterations (``--stage1-best-on-target-val``: also keeps the best on target val)."""
    a, sums = run.args, {}
    checked = True  # protocl's value checks on the first step of a stage (or always)
    while state["iteration"] < min(until or a.source_iters, a.source_iters):
        set_lr(run.optimizer, (1 - state["iteration"] / a.source_iters) ** 0.9)
        batch = next(run.source_stream)  # host-side data loading, before the step
        count_skips(run, state, batch)
        with step_scope(run, "source", checked or a.value_checks == "always", step_context):
            stats = source_step(run, batch)
            accumulate(sums, stats)
            watch(run, state, stats)
        checked = False
        state["iteration"] += 1
        state["step"] += 1
        if state["iteration"] % a.log_every == 0 or state["iteration"] == a.source_iters:  # ---- log point
            log_point(run, state, "source", sums)
        if state["iteration"] % a.ckpt_every == 0 and state["iteration"] < a.source_iters:
            if a.stage1_best_on_target_val:
                keep_if_best(run, state)
            save_checkpoint(run, state)
        stop_point(run, state)


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
    if run.rank == 0:
        checkpoint.save_atomic({"model": run.model.state_dict(), "config": run.config}, run.out / "source_only.pt")
    state["metrics"]["source_only"] = evaluate(run, state, "source-only (stage 1, last checkpoint)")
    begin_phase(run, state, "adapt")


def keep_if_best(run: Run, state: dict) -> None:
    """``--stage1-best-on-target-val``: keep the stage-1 weights with the best target-val mIoU."""
    result = evaluate(run, state, f"stage 1 it {state['iteration']} (checkpoint selection on target val)")
    if result["miou"] > state["metrics"].get("stage1_best_miou", -1.0):
        state["metrics"]["stage1_best_miou"] = result["miou"]
        if run.rank == 0:
            checkpoint.save_atomic({"model": run.model.state_dict(), "iteration": state["iteration"],
                                    "miou": result["miou"]}, run.out / "source_best.pt")
        dist.barrier()


@torch.no_grad()
def make_static_labels(run: Run, round_index: int) -> list[float]:
    """Static labels of the whole target train split (sharded over ranks; class-balanced thresholds merged),
    written to ``<out>/pseudo_labels/round_XX`` and handed to the target stream; returns the class thresholds.
    A round whose labels are complete on disk (a resumed run) is not recomputed."""
    a, final = run.args, run.out / "pseudo_labels" / f"round_{round_index:02d}"
    run.target_set.pseudo_dir = final
    run.target_stream.restart()  # the stream's workers hold a copy of the dataset
    marker = final / ".complete"
    if marker.is_file():
        return json.loads(marker.read_text())["class_thresholds"]
    tmp = final.with_name(final.name + ".tmp")
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    run.model.eval()
    shard = run.target_train[run.rank::run.world]
    loader = DataLoader(PseudoLabelSet(shard, resize=a.resize, on_bad_sample=a.on_bad_sample), batch_size=1,
                        num_workers=min(a.workers, 2), pin_memory=run.device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    thresholds = protocl.ClassBalancedThresholds(run.num_classes, proportion=a.proportion, sync=False).to(run.device)
    cache, budget = [], a.pseudo_cache_mb * 2**20  # logits kept for the second pass, within the budget

    def full_logits(images: Tensor) -> Tensor:
        return F.interpolate(forward(run, run.model, images)[0], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    skipped = set()  # --on-bad-sample skip: unreadable images, left out of the thresholds, labelled all-ignore
    for index, batch in enumerate(loader):
        for path, message in skip_records(batch):
            skipped.add(index)
            run.log(f"warning: skipped {path!r}, left out of round {round_index}'s static labels "
                    f"(--on-bad-sample skip): {message}")
        if index in skipped:
            cache.append(None)
            continue
        logits = full_logits(batch["image"])
        thresholds.update(logits)
        budget -= logits.numel() * logits.element_size()
        cache.append(logits.cpu() if budget > 0 else None)
    all_reduce_sum_(thresholds.histogram)  # merged thresholds: identical on every rank
    class_thresholds = thresholds.compute()
    covered = torch.zeros(2, dtype=torch.int64, device=run.device)  # labelled pixels, all pixels
    second_pass = loader if any(c is None for i, c in enumerate(cache) if i not in skipped) else [None] * len(cache)
    for index, (batch, cached) in enumerate(zip(second_pass, cache)):
        if index in skipped:  # the training set skips this image too; its label file just has to exist
            Image.new("L", (1, 1), IGNORE_INDEX).save(tmp / f"{shard[index].name}.png")
            continue
        logits = cached.to(run.device) if cached is not None else full_logits(batch["image"])
        labels = protocl.static_pseudo_label(logits, class_thresholds=class_thresholds, proportion=a.proportion)
        covered += torch.stack([torch.count_nonzero(labels != IGNORE_INDEX),
                                torch.full((), labels.numel(), dtype=torch.int64, device=labels.device)])
        Image.fromarray(labels[0].to(torch.uint8).cpu().numpy()).save(tmp / f"{shard[index].name}.png")
    all_reduce_sum_(covered)
    dist.barrier()
    if run.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker.write_text(json.dumps({"class_thresholds": class_thresholds.tolist()}))
    dist.barrier()
    run.model.train()
    finite = class_thresholds[torch.isfinite(class_thresholds)]
    run.log(f"round {round_index}: static labels for {len(run.target_train)} target images, coverage "
            f"{100 * float(covered[0]) / max(1, int(covered[1])):.1f}%, class thresholds median "
            f"{float(finite.median()) if finite.numel() else float('nan'):.3f} ({finite.numel()} classes seen)")
    return class_thresholds.tolist()


def adapt_round(run: Run, state: dict, *, step: Callable = adapt_step, until: int | None = None,
                step_context: StepContext | None = None) -> None:
    """One round of stage 2 (phase "adapt", on the static labels of :func:`make_static_labels`) or of the
    same-budget control (phase "control": source batches only), from ``state["iteration"]`` to ``until``
    (default: the round's end, then evaluation, diagnostics, the round's figure and a checkpoint).

    ``step(run, src, tgt)`` is the training step (default :func:`adapt_step`; studies pass their own)."""
    a, sums, last = run.args, {}, None
    control = state["phase"] == "control"
    checked = True  # new static labels: check their values on the round's first step
    while state["iteration"] < min(until or a.round_iters, a.round_iters):
        set_lr(run.optimizer, 0.5 ** state["round"] * (1 - state["iteration"] / a.round_iters) ** 0.9)
        src = next(run.source_stream)  # host-side data loading, before the step
        tgt = None if control else next(run.target_stream)  # the control never looks at the target
        count_skips(run, state, src)
        if tgt is not None:
            count_skips(run, state, tgt)
        with step_scope(run, state["phase"], checked or a.value_checks == "always", step_context):
            stats, labels = step(run, src, tgt)
            if "signal_counts" in stats:  # the round's sums (uda.signals), not a mean of the log point
                state["signal_counts"] += stats.pop("signal_counts")
            accumulate(sums, stats)
            watch(run, state, stats)
            if a.diagnostics and labels is not None:  # opt-in: target ground truth, never trained on
                gt = tgt["label"].to(run.device, non_blocking=True).long()
                for i, kind in enumerate(diagnostics.LABEL_KINDS):
                    state["label_counts"][i] += diagnostics.class_counts(labels[kind], gt, run.num_classes)
        checked, last = False, (tgt, labels)
        state["iteration"] += 1
        state["step"] += 1
        if state["iteration"] % a.log_every == 0 or state["iteration"] == a.round_iters:  # ---- log point
            log_point(run, state, state["phase"], sums)
        if state["iteration"] % a.ckpt_every == 0 and state["iteration"] < a.round_iters:
            save_checkpoint(run, state)
        stop_point(run, state)
    if state["iteration"] < a.round_iters:
        return
    name = "source_only_continued" if control else "adapted"
    result = evaluate(run, state, f"{'control' if control else 'adapted'} round {state['round']}")
    if not control:
        state["metrics"].setdefault("rounds", []).append({"round": state["round"], "miou": result["miou"]})
        if a.diagnostics:
            round_diagnostics(run, state)
        if a.signals:
            signals.end_round(run, state, run.table.names)
        if run.rank == 0 and last is not None and last[1] is not None:
            round_figure(run, state["round"], *last)
    state["round"], state["iteration"] = state["round"] + 1, 0
    state["label_counts"].zero_()
    state["signal_counts"].zero_()
    if state["round"] < a.rounds:
        save_checkpoint(run, state)
    else:
        state["metrics"][name] = result


def train(run: Run, state: dict, *, step: Callable = adapt_step, step_context: StepContext | None = None) -> None:
    """Both stages (and the same-budget control with ``--control``) from wherever ``state`` is."""
    if state["phase"] == "source":
        train_source(run, state, step_context=step_context)
        end_source(run, state)
    while state["phase"] in ("adapt", "control"):
        if state["phase"] == "adapt":
            state["thresholds"] = make_static_labels(run, state["round"])
        adapt_round(run, state, step=step, step_context=step_context)
        if state["round"] == run.args.rounds and state["phase"] == "adapt":
            check_finite(run, state)
            if run.rank == 0:
                checkpoint.save_atomic({"model": run.model.state_dict(), "config": run.config},
                                       run.out / "adapted.pt")
            begin_phase(run, state, "control" if run.args.control else "done")
        elif state["round"] == run.args.rounds:
            begin_phase(run, state, "done")


# ---------------------------------------------------------------------------------------------- evaluation, logs
def evaluate(run: Run, state: dict, label: str) -> dict:
    """Target val mIoU of the current model (sharded over ranks), logged and added to the curves."""
    result = evaluate_model(run.model, run.val_loader, run.num_classes, run.device, subsets=run.subsets,
                            amp_dtype=AMP_DTYPES[run.args.amp])
    if hasattr(run.val_loader, "take"):  # files left out of the score (--on-bad-sample skip)
        record_skips(run, state, run.val_loader.take(), "left out of the evaluation")
    h, a = state["history"], run.args
    if state["phase"] == "control":  # plotted at the iteration count it matches (same budget as the adapted model)
        h.setdefault("control_iter", []).append(a.source_iters + state["round"] * a.round_iters + state["iteration"])
        h.setdefault("control_miou", []).append(result["miou"])
    else:
        h["eval_iter"].append(state["step"])
        h["eval_miou"].append(result["miou"])
    extra = "".join(f", mIoU{n} {result[f'miou{n}']:.2f}" for n in (run.subsets or {}))
    run.log(f"eval {label}: target val mIoU {result['miou']:.2f}{extra}")
    scalars(run, state, "eval_control" if state["phase"] == "control" else "eval",
            {k: v for k, v in result.items() if k.startswith("miou")})
    return result


def log_point(run: Run, state: dict, kind: str, sums: dict[str, Tensor]) -> None:
    """THE log point of both loops: the only host read of the step statistics (their means since the last log
    point), then the log line, the curves and TensorBoard; ``sums`` is emptied."""
    a = run.args
    n = state["iteration"] % a.log_every or a.log_every  # steps since the last log point
    means = {k: float(v) / n for k, v in sums.items()}
    sums.clear()
    total = a.source_iters + a.rounds * a.round_iters * (2 if a.control else 1)
    rate = (state["step"] - run.started[1]) / max(1e-9, time.time() - run.started[0])
    where = "stage 1" if kind == "source" else f"{'control' if kind == 'control' else 'stage 2'} round {state['round']}"
    line = (f"[{state['step']}/{total}] {rate:.2f} it/s eta {(total - state['step']) / max(rate, 1e-9) / 60:.1f} min"
            f" | {where} it {state['iteration']} | "
            + " ".join(f"{k} {means[k]:.3f}" for k in ("ce_src", "ce_tgt", "ent", "fcl", "bcl") if k in means))
    if kind == "adapt":
        line += (" | coverage static/dynamic/hybrid "
                 f"{means['cov_static']:.0f}/{means['cov_dynamic']:.0f}/{means['cov_hybrid']:.0f}%")
        if a.diagnostics:  # the round so far, summed over ranks (a collective: every rank is here)
            counts = all_reduce_sum_(state["label_counts"].clone())
            summary = {n: diagnostics.summarize(counts[i]) for i, n in enumerate(diagnostics.LABEL_KINDS)}
            line += " | class-mean coverage/precision " + " ".join(
                f"{n} {diagnostics.pct(v['class_mean_coverage'])}/{diagnostics.pct(v['class_mean_precision'])}"
                for n, v in summary.items()) + "% (round so far, target GT, diagnostic only)"
            for n, v in summary.items():
                means[f"class_mean_coverage_{n}"] = v["class_mean_coverage"]
                means[f"class_mean_precision_{n}"] = v["class_mean_precision"]
        if a.signals:  # label-free: what a user without target labels can read (a collective, like the above)
            line += signals.log_summary(signals.summarize(all_reduce_sum_(state["signal_counts"].clone())),
                                        run.table.names)
        state["history"]["log_iter"].append(state["step"] - a.source_iters)
        for name in diagnostics.LABEL_KINDS:
            state["history"][f"coverage_{name}"].append(means[f"cov_{name}"])
    run.log(line)
    scalars(run, state, "control" if kind == "control" else "train", means)
    check_finite(run, state)  # the guard's one host read, next to the losses' (a non-finite term stops here)


def watch(run: Run, state: dict, stats: dict[str, Tensor]) -> None:
    """Record non-finite loss terms and gradients of the step that just ran (device-side, no host read); the
    record is read at the log point."""
    if run.guard is not None:
        run.guard.update(state["step"] + 1, {k: v for k, v in stats.items() if not k.startswith("cov_")},
                         run.model.parameters())


def count_skips(run: Run, state: dict, batch: dict) -> None:
    """``--on-bad-sample skip``: log and count the bad files a batch passed over (a host-side CPU tensor)."""
    record_skips(run, state, skip_records(batch), "replaced by the next sample")


def record_skips(run: Run, state: dict, records: list[tuple[str, str]], what: str) -> None:
    bad = state["bad_samples"]
    for path, message in records:
        bad["skipped"] += 1
        if path not in bad["files"]:
            bad["files"].append(path)
        run.log(f"warning: skipped {path!r}, {what} (--on-bad-sample skip): {message}")


def stop_point(run: Run, state: dict) -> None:
    """After a step: if SIGTERM/SIGUSR1 was received (on any rank), write the checkpoint (all ranks, atomically)
    and raise :class:`uda.runtime.Stopped`; :func:`main` logs it and exits with status 75."""
    if run.stop is None or not run.stop.requested():
        return
    save_checkpoint(run, state)
    raise runtime.Stopped(run.stop.signal_name if run.stop.signum is not None else "a signal on another rank")


def accumulate(sums: dict[str, Tensor], stats: dict[str, Tensor]) -> None:
    for k, v in stats.items():
        sums[k] = sums.get(k, 0) + v


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor`` (the classifier group has a 10x base)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        try:  # set-up errors (missing dataset roots, bad --init or --resume files) end with a clear message
            run = setup(args)
            state = start(run)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        checks_before = protocl.value_checks_enabled()
        every = 1 if run.world == 1 else min(10, run.args.log_every)  # ranks agree on a stop every N steps
        stopped = False
        try:
            with runtime.StopRequest(every=every) as stop:
                run.stop = stop
                train(run, state)
                finish(run, state)
        except runtime.Stopped as request:
            run.log(f"stop requested ({request}) at step {state['step']}: checkpoint written to "
                    f"{run.out / 'checkpoint.pt'}; run the same command with --resume auto to continue "
                    f"(exit status {runtime.EXIT_STOPPED})")
            stopped = True  # StopRequest now ignores SIGTERM/SIGUSR1: the exit status stays 75
            return runtime.EXIT_STOPPED
        except runtime.NonFiniteError as error:
            kept = run.out / "checkpoint.pt"
            print(f"error: {error}; stopped, the last good checkpoint {str(kept)!r} is kept"
                  + ("" if kept.is_file() else " (none written yet)"), file=sys.stderr)
            return 1
        except (BadSampleError, OSError) as error:  # a bad file during training, a checkpoint that failed to write
            print(f"error: {runtime.last_line(error)}", file=sys.stderr)
            return 1
        finally:
            protocl.set_value_checks(checks_before)
            run.source_stream.close()  # the DataLoader workers go now, whatever ended the run
            run.target_stream.close()
            if run.tb is not None:
                run.tb.close()
            if stopped:  # all ranks agreed on the stop: they leave together, so torchrun sees one clean stop
                dist.barrier()
        return 0
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
