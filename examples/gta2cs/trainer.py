r"""The two training stages of the reference pipeline (protocl method spec §4).

Stage 1 trains on labelled source crops (cross-entropy) and keeps the last weights. Stage 2 adapts in rounds:
at the start of each round static pseudo labels are regenerated over the target train split
(:class:`protocl.ClassBalancedThresholds` + :func:`protocl.static_pseudo_label`) and written to disk; every
step the orchestrator :class:`protocl.BidirectionalContrast` turns them into hybrid labels and returns the
FCL + BCL loss; the step loss is

    CE(source) + 0.3·CE(target, y_T) + 0.4·(H(source) + 0.3·H(target)) + λ_FCL·FCL + λ_BCL·BCL.

All state lives in :class:`RunState` and the checkpoint, so ``--resume`` continues bit for bit.

The training step never synchronises with the host: batches come from page-locked memory with non-blocking
copies, losses and statistics are accumulated on the device and read only every ``--log-every`` steps, the
model's channel order is a Python attribute, and protocl's value checks (one host read per label map) run on
the first step of each stage and round only (``--value-checks always`` keeps them on). ``--sync-debug`` runs
every other step under ``torch.cuda.set_sync_debug_mode("error")``, so that any sync raises.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import protocl

from . import checkpoint, dist, figures
from .data import (
    CLASS_NAMES,
    IGNORE,
    SYNTHIA_CLASSES_13,
    SYNTHIA_CLASSES_16,
    BatchStream,
    EvalSet,
    PseudoLabelSet,
    Sample,
    TrainSet,
    cityscapes_files,
    gta5_files,
    pseudo_label_size,
    read_sample_label,
    synthia_files,
)
from .evaluate import evaluate, iou_table, mean_iou
from .model import build_model

SOURCE_STREAM, TARGET_STREAM = 0, 1
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
LABEL_KINDS = ("static", "dynamic", "hybrid")
COUNT_NAMES = ("gt", "covered", "labelled", "correct")  # rows of the per-class diagnostic counts


class Log:
    """Print on rank 0 and append to ``<out>/log.txt``."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path, self.rank = out / "log.txt", rank

    def __call__(self, message: str) -> None:
        if self.rank != 0:
            return
        print(message, flush=True)
        with open(self.path, "a") as f:
            f.write(message + "\n")


@dataclass
class RunState:
    """Where the run is: stage ("source", "adapt", "control", "done"), round, iteration within the stage/round."""

    stage: str = "source"
    round: int = 0
    iteration: int = 0
    thresholds: list[float] | None = None
    metrics: dict = field(default_factory=dict)
    history: dict = field(default_factory=lambda: {"eval_iter": [], "eval_miou": [], "log_iter": [],
                                                   "coverage_static": [], "coverage_dynamic": [],
                                                   "coverage_hybrid": []})


def safe_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over non-ignored pixels; 0 (in the graph) when every pixel is ignored, never NaN."""
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    return total / (labels != IGNORE).sum().clamp_min(1)


def gate_dynamic(static: Tensor, hybrid: Tensor, prediction: Tensor) -> Tensor:
    """``--gate-dynamic prediction``: keep the hybrid label where a static label exists, and elsewhere (a label
    the dynamic branch filled in) only where it equals the classifier's own prediction; else ignore."""
    return torch.where((static != IGNORE) | (hybrid == prediction), hybrid, torch.full_like(hybrid, IGNORE))


def gate_by_agreement(static: Tensor, dynamic: Tensor, hybrid: Tensor, num_classes: int,
                      min_agreement: float = 0.5, prediction: Tensor | None = None) -> Tensor:
    """``--gate-dynamic agreement``: keep a dynamic fill-in of class c only if, in this batch, the dynamic labels
    of class c agree with the static labels on at least ``min_agreement`` of the pixels that carry both.

    A label-free estimate of each class's dynamic-label precision: static labels are the precise ones (most
    classes 90-100 %), so where both exist their agreement measures how often a dynamic c is right. A class
    whose dynamic labels never meet a static label keeps them (no evidence against). Static labels are always
    kept. With ``prediction`` (``--gate-dynamic either``), a dynamic fill-in that equals the classifier's argmax
    is kept as well. Per-class counts with ``scatter_add_`` on the device: no host sync.
    """
    K = num_classes
    has_static, has_dynamic = static != IGNORE, dynamic != IGNORE
    column = torch.where(has_static & has_dynamic, dynamic, K).flatten()  # class K: not counted
    overlap = torch.zeros(K + 1, device=dynamic.device).scatter_add_(0, column, torch.ones_like(column,
                                                                                                dtype=torch.float))
    agree = torch.zeros(K + 1, device=dynamic.device).scatter_add_(
        0, column, (static == dynamic).flatten().float())
    reliable = agree >= min_agreement * overlap  # K + 1 flags; True where no overlap (0 >= 0)
    keep = has_static | reliable[torch.where(has_dynamic, dynamic, K)]
    if prediction is not None:
        keep = keep | (hybrid == prediction)
    return torch.where(keep, hybrid, torch.full_like(hybrid, IGNORE))


def poly_lr(base: float, iteration: int, total: int, power: float = 0.9) -> float:
    return base * (1 - iteration / max(1, total)) ** power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor`` (the classifier group has a 10x base)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


def labelled_and_total(labels: Tensor) -> Tensor:
    """``(2,)`` int64 on ``labels``' device: labelled pixels and all pixels (no host read)."""
    return torch.stack([torch.count_nonzero(labels != IGNORE),
                        torch.full((), labels.numel(), dtype=torch.int64, device=labels.device)])


def class_counts(labels: Tensor, gt: Tensor, num_classes: int) -> Tensor:
    r"""Per-class agreement counts of pseudo ``labels`` with ground truth ``gt`` (same shape), ``(4, K)`` int64:

    - ``gt[k]``: pixels of class k in the ground truth;
    - ``covered[k]``: of those, the pixels that carry a pseudo label (of any class);
    - ``labelled[k]``: pixels labelled k where the ground truth is known;
    - ``correct[k]``: pixels labelled k whose ground truth is k.

    One ``scatter_add_`` into a device tensor: no ``bincount`` (whose output size needs a host read on CUDA).
    """
    K = num_classes
    known, has_label = gt != IGNORE, labels != IGNORE
    index = torch.stack([
        torch.where(known, gt, K),  # gt
        torch.where(known & has_label, gt, K),  # covered
        torch.where(known & has_label, labels, K),  # labelled
        torch.where(known & (labels == gt), gt, K),  # correct
    ]).flatten(1)  # 4 N
    index = index + torch.arange(4, device=index.device)[:, None] * (K + 1)
    counts = torch.zeros(4 * (K + 1), dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten()))
    return counts.view(4, K + 1)[:, :K]


def diagnostics_summary(counts: Tensor) -> dict:
    """Per-class coverage / precision / recall (percent, NaN where undefined) and their class means from
    :func:`class_counts` sums ``(4, K)``; pixel-level values alongside, for comparison."""
    gt, covered, labelled, correct = (c.double() for c in counts.cpu())

    def ratio(num: Tensor, den: Tensor) -> list[float]:
        return [100.0 * float(n / d) if d > 0 else math.nan for n, d in zip(num, den)]

    coverage, precision, recall = ratio(covered, gt), ratio(correct, labelled), ratio(correct, gt)
    return {
        "coverage": coverage, "precision": precision, "recall": recall,
        "class_mean_coverage": mean_iou(coverage), "class_mean_precision": mean_iou(precision),
        "class_mean_recall": mean_iou(recall),
        "pixel_coverage": 100.0 * float(covered.sum() / gt.sum().clamp_min(1)),
        "pixel_precision": 100.0 * float(correct.sum() / labelled.sum().clamp_min(1)),
        "counts": {name: [int(v) for v in row] for name, row in zip(COUNT_NAMES, counts.cpu())},
    }


@contextlib.contextmanager
def sync_debug_error(device: torch.device):
    """``torch.cuda.set_sync_debug_mode("error")`` inside the block on CUDA (no-op elsewhere)."""
    if device.type != "cuda":
        yield
        return
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


class Trainer:
    """Builds data, model, optimizer and the orchestrator from ``args`` and runs (or resumes) both stages.

    ``step_context``: an optional ``(kind, checked) -> context manager`` entered around every training step
    (``kind`` is ``"source"``, ``"adapt"`` or ``"control"``; ``checked`` is True on the steps that run
    protocl's value checks). A step starts from batches already loaded on the host (page-locked on CUDA) and
    ends after the optimizer step; data loading, logging, evaluation and checkpoints happen outside it: tests
    and benchmarks use it to watch the steps alone.
    """

    def __init__(self, args) -> None:
        self.args = args
        self.rank, self.world, self.device = dist.setup(args.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out, self.rank)
        checkpoint.seed_everything(args.seed)
        self.num_classes = len(CLASS_NAMES)
        source = gta5_files(args.gta5_root) if args.source == "gta5" else synthia_files(args.synthia_root)
        self.subsets = {"16": SYNTHIA_CLASSES_16, "13": SYNTHIA_CLASSES_13} if args.source == "synthia" else None
        self.target_train = cityscapes_files(args.cityscapes_root, "train", require_labels=False)
        self.target_val = cityscapes_files(args.cityscapes_root, "val")
        if args.diagnostics:
            missing = [s.image for s in self.target_train if s.label is None]
            if missing:
                raise ValueError(f"expected gtFine train labels for --diagnostics (they are read for the logged "
                                 f"pseudo-label diagnostics only), got {len(missing)} images without, e.g. "
                                 f"{str(missing[0])!r}")
        scales = tuple(args.scales)
        pin = self.device.type == "cuda"
        self.source_set = TrainSet(source, resize=args.resize, crop=args.crop, scales=scales)
        self.target_set = TrainSet(self.target_train, resize=args.resize, crop=args.crop, scales=scales,
                                   labels=args.diagnostics)  # target ground truth: read only when asked for
        stream_kw = {"seed": args.seed, "rank": self.rank, "world": self.world, "workers": args.workers,
                     "pin_memory": pin}
        self.source_stream = BatchStream(self.source_set, args.batch_size, stream=SOURCE_STREAM, **stream_kw)
        self.target_stream = BatchStream(self.target_set, args.batch_size, stream=TARGET_STREAM, **stream_kw)
        val_shard = self.target_val[self.rank::self.world]
        self.val_loader = DataLoader(EvalSet(val_shard, size=tuple(args.eval_size)), batch_size=1,
                                     num_workers=min(args.workers, 2), pin_memory=pin)
        self.model = build_model(args.arch, self.num_classes, features=args.features, proj_dim=args.proj_dim,
                                 init=args.init).to(self.device)
        if args.arch == "deeplabv2" and args.init is None:
            self.log("warning: --init not given, DeepLab-V2 starts from random weights (expect poor results)")
        self.ddp = (DistributedDataParallel(self.model, device_ids=None if self.device.type == "cpu" else [self.device],
                                            find_unused_parameters=args.features == "layer4")
                    if self.world > 1 else self.model)
        self.contrast = protocl.BidirectionalContrast(
            self.num_classes, self.model.feature_dim,
            fcl_weight=0.0 if args.no_contrastive else args.fcl_weight,
            bcl_weight=0.0 if args.no_contrastive else args.bcl_weight,
            temperature=args.temperature, momentum=args.ema_momentum, threshold=args.threshold, fuse=args.fuse,
            calibrate=not args.no_calibration, dynamic=not args.no_dynamic,
        ).to(self.device)
        # with neither FCL/BCL nor dynamic labels the orchestrator has nothing to contribute: not called at all
        self.uses_contrast = not (args.no_contrastive and args.no_dynamic)
        self.amp_dtype = AMP_DTYPES[args.amp]
        self.optimizer = self._new_optimizer(args.source_lr)
        self.state = RunState()
        self.diag = torch.zeros(len(LABEL_KINDS), len(COUNT_NAMES), self.num_classes, dtype=torch.int64,
                                device=self.device)  # per-class counts of the current round (--diagnostics)
        self.total_iters = args.source_iters + args.rounds * args.round_iters + (
            args.rounds * args.round_iters if args.control else 0)
        self.step_context: Callable | None = None
        self._check_next = True  # run protocl's value checks on the next step (first of a stage or round)
        self.tb = None
        if args.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise ValueError(f"expected the tensorboard package for --tensorboard (pip install tensorboard, "
                                 f"or pip install -e '.[examples]'), got ImportError: {error}") from None
            self.tb = SummaryWriter(str(self.out / "tensorboard"))
        self._t0, self._it0 = time.time(), 0

    # ------------------------------------------------------------------ helpers
    def _new_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """SGD (fused on CUDA: with a GradScaler it skips inf steps without a host read); a fresh GradScaler."""
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.args.amp == "fp16")
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.SGD(self.model.param_groups(lr), lr=lr, momentum=0.9, weight_decay=5e-4, **fused)

    def _to_device(self, tensor: Tensor) -> Tensor:
        return tensor.to(self.device, non_blocking=True)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _forward(self, net: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """The network under autocast (``--amp``); logits back in fp32 for the losses (protocl's losses upcast
        the features themselves, so those stay in the autocast dtype)."""
        with self._autocast():
            logits, features = net(images)
        return logits.float(), features

    def _optimize(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    @contextlib.contextmanager
    def _step_scope(self, kind: str):
        """Around one training step: protocl value checks on the first step of a stage or round (or always with
        ``--value-checks always``), ``--sync-debug`` on every other step, and :attr:`step_context`."""
        checked = self._check_next or self.args.value_checks == "always"
        protocl.set_value_checks(checked)
        debug = sync_debug_error(self.device) if self.args.sync_debug and not checked else contextlib.nullcontext()
        watch = self.step_context(kind, checked) if self.step_context is not None else contextlib.nullcontext()
        with debug, watch:
            yield
        self._check_next = False

    def _done_iters(self) -> int:
        a, s = self.args, self.state
        if s.stage == "source":
            return s.iteration
        if s.stage == "adapt":
            return a.source_iters + s.round * a.round_iters + s.iteration
        if s.stage == "control":
            return a.source_iters + (a.rounds + s.round) * a.round_iters + s.iteration
        return self.total_iters

    def _progress(self) -> str:
        done = self._done_iters()
        rate = (done - self._it0) / max(1e-9, time.time() - self._t0)
        eta = (self.total_iters - done) / max(rate, 1e-9)
        return f"[{done}/{self.total_iters}] {rate:.2f} it/s eta {eta / 60:.1f} min"

    def _scalars(self, prefix: str, values: dict[str, float]) -> None:
        """TensorBoard scalars (``--tensorboard``) at the current total iteration."""
        if self.tb is not None:
            for name, value in values.items():
                self.tb.add_scalar(f"{prefix}/{name}", value, self._done_iters())

    def _reduced_diag(self) -> Tensor:
        """This round's per-class counts summed over ranks (a copy; a collective: call it on every rank)."""
        return dist.all_reduce_sum(self.diag.clone())

    def checkpoint_state(self, diag: Tensor) -> dict:
        return {
            "state": self.state.__dict__.copy(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
            "contrast": self.contrast.state_dict(), "diagnostics": diag.cpu(),
            "streams": {"source": self.source_stream.state_dict(), "target": self.target_stream.state_dict()},
            "rng": checkpoint.rng_state(), "config": vars(self.args).copy(), "world_size": self.world,
        }

    def save(self, name: str = "checkpoint.pt") -> None:
        diag = self._reduced_diag()  # the round's counts over all ranks; rank 0 restores them on resume
        if self.rank == 0:
            checkpoint.save_atomic(self.checkpoint_state(diag), self.out / name)
        dist.barrier()

    def resume(self, path: str) -> None:
        ckpt = checkpoint.load(path)
        self.state = RunState(**ckpt["state"])
        self.model.load_state_dict(ckpt["model"])
        if self.state.stage in ("adapt", "control"):
            self.optimizer = self._new_optimizer(self.args.lr)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        elif self.scaler.is_enabled():
            self.log("note: the checkpoint has no fp16 GradScaler state (it was trained without --amp fp16): "
                     "starting a fresh scaler")
        self.contrast.load_state_dict(ckpt["contrast"])
        if "diagnostics" in ckpt and self.rank == 0:
            self.diag.copy_(ckpt["diagnostics"])
        if ckpt.get("world_size", 1) == self.world:
            self.source_stream.load_state_dict(ckpt["streams"]["source"])
            self.target_stream.load_state_dict(ckpt["streams"]["target"])
        else:  # another world size shards differently: continue at the next epoch of each stream
            for stream, key in ((self.source_stream, "source"), (self.target_stream, "target")):
                stream.load_state_dict({"epoch": ckpt["streams"][key]["epoch"] + 1, "position": 0})
            self.log(f"note: checkpoint from {ckpt.get('world_size')} ranks resumed on {self.world}: "
                     "data streams restart at the next epoch (model, optimizer, EMA, thresholds restored exactly)")
        checkpoint.set_rng_state(ckpt["rng"])
        self.log(f"resumed {path}: stage {self.state.stage}, round {self.state.round}, iteration {self.state.iteration}")

    def _stop_requested(self) -> bool:
        """Test hook: ``--stop-after N`` ends the process after N total iterations without saving (a crash)."""
        return self.args.stop_after is not None and self._done_iters() >= self.args.stop_after

    def _evaluate(self, label: str, *, control: bool = False) -> dict:
        result = evaluate(self.model, self.val_loader, self.num_classes, self.device, subsets=self.subsets,
                          amp_dtype=self.amp_dtype)
        h, s, a = self.state.history, self.state, self.args
        if control:  # plotted at the iteration count it matches (same budget as the adapted model)
            h.setdefault("control_iter", []).append(a.source_iters + s.round * a.round_iters + s.iteration)
            h.setdefault("control_miou", []).append(result["miou"])
        else:
            h["eval_iter"].append(self._done_iters())
            h["eval_miou"].append(result["miou"])
        extra = "".join(f", mIoU{n} {result[f'miou{n}']:.2f}" for n in (self.subsets or {}))
        self.log(f"eval {label}: target val mIoU {result['miou']:.2f}{extra}")
        self._scalars("eval_control" if control else "eval",
                      {k: v for k, v in result.items() if k.startswith("miou")})
        return result

    # ------------------------------------------------------------------ stage 1
    def _source_step(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, labels = self._to_device(batch["image"]), self._to_device(batch["label"]).long()
        logits, _ = self._forward(self.ddp, images)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = safe_cross_entropy(logits, labels)
        self._optimize(loss)
        return {"ce_src": loss.detach()}

    def train_source(self) -> bool:
        a, s = self.args, self.state
        sums: dict[str, Tensor] = {}
        while s.iteration < a.source_iters:
            set_lr(self.optimizer, (1 - s.iteration / a.source_iters) ** 0.9)
            batch = next(self.source_stream)  # host-side data loading, before the step
            with self._step_scope("source"):
                for k, v in self._source_step(batch).items():
                    sums[k] = sums.get(k, 0) + v
            s.iteration += 1
            if s.iteration % a.log_every == 0 or s.iteration == a.source_iters:
                n = a.log_every if s.iteration % a.log_every == 0 else s.iteration % a.log_every
                means = {k: float(v) / n for k, v in sums.items()}  # the only host read of the losses
                self.log(f"{self._progress()} | stage 1 it {s.iteration} | "
                         + " ".join(f"{k} {v:.3f}" for k, v in means.items()))
                self._scalars("train", means)
                sums = {}
            if self._stop_requested():
                return False
            if s.iteration % a.ckpt_every == 0 and s.iteration < a.source_iters:
                if a.stage1_best_on_target_val:
                    self._keep_if_best()
                self.save()
        if a.stage1_best_on_target_val:
            self._keep_if_best()
            best = checkpoint.load(self.out / "source_best.pt")
            self.model.load_state_dict(best["model"])
            self.log(f"stage 1: using the checkpoint of iteration {best['iteration']} (best target-val mIoU "
                     f"{best['miou']:.2f}; this selection reads target labels)")
        if self.rank == 0:
            checkpoint.save_atomic({"model": self.model.state_dict(), "config": vars(a).copy()},
                                   self.out / "source_only.pt")
        s.metrics["source_only"] = self._evaluate("source-only (stage 1, last checkpoint)")
        s.stage, s.round, s.iteration = "adapt", 0, 0
        self.optimizer = self._new_optimizer(a.lr)
        self.save()
        return True

    def start_from_source(self, path: str) -> None:
        """``--source-checkpoint``: skip stage 1 and start stage 2 from the model weights in ``path``.

        Accepts ``source_only.pt`` / ``adapted.pt`` (``{"model": ...}``) or a ``checkpoint.pt`` of another run; the
        weights are copied to ``<out>/source_only.pt`` (the same-budget control starts from them) and evaluated.
        """
        file = Path(path)
        if not file.is_file():
            raise ValueError(f"expected --source-checkpoint to be a checkpoint file, got {str(file)!r} (not a file)")
        ckpt = checkpoint.load(file)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise ValueError(f"expected --source-checkpoint {str(file)!r} to hold {{'model': state_dict}}, "
                             f"got {type(ckpt).__name__} with keys {sorted(ckpt)[:5] if isinstance(ckpt, dict) else []}")
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as error:
            raise ValueError(f"expected --source-checkpoint {str(file)!r} to match --arch {self.args.arch}: {error}")
        a, s = self.args, self.state
        if self.rank == 0:
            checkpoint.save_atomic({"model": self.model.state_dict(), "config": vars(a).copy(), "from": str(file)},
                                   self.out / "source_only.pt")
        dist.barrier()
        self.log(f"stage 1 skipped: source model loaded from {file}")
        s.metrics["source_only"] = self._evaluate("source-only (loaded with --source-checkpoint)")
        s.stage, s.round, s.iteration = "adapt", 0, 0
        self.optimizer = self._new_optimizer(a.lr)
        self.save()

    def _keep_if_best(self) -> None:
        """``--stage1-best-on-target-val``: keep the stage-1 weights with the best target-val mIoU."""
        result = self._evaluate(f"stage 1 it {self.state.iteration} (checkpoint selection on target val)")
        best = self.state.metrics.get("stage1_best_miou", -1.0)
        if result["miou"] > best:
            self.state.metrics["stage1_best_miou"] = result["miou"]
            if self.rank == 0:
                checkpoint.save_atomic({"model": self.model.state_dict(), "iteration": self.state.iteration,
                                        "miou": result["miou"]}, self.out / "source_best.pt")
            dist.barrier()

    # ------------------------------------------------------------------ static labels
    def _pseudo_dir(self, round_index: int) -> Path:
        return self.out / "pseudo_labels" / f"round_{round_index:02d}"

    @torch.no_grad()
    def generate_static_labels(self, round_index: int) -> list[float]:
        """Static labels of the whole target train split (sharded), written to ``pseudo_labels/round_XX``."""
        a = self.args
        final = self._pseudo_dir(round_index)
        marker = final / ".complete"
        if marker.is_file():  # resumed inside a round: the round's labels are already on disk
            return json.loads(marker.read_text())["class_thresholds"]
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model = self.model
        model.eval()
        shard = self.target_train[self.rank::self.world]
        loader = DataLoader(PseudoLabelSet(shard, resize=a.resize), batch_size=1, num_workers=min(a.workers, 2),
                            pin_memory=self.device.type == "cuda")
        thresholds = protocl.ClassBalancedThresholds(self.num_classes, proportion=a.proportion, sync=False)
        thresholds = thresholds.to(self.device)
        cache = []
        budget = a.pseudo_cache_mb * 2**20
        for batch in loader:
            logits = self._full_logits(model, batch["image"])
            thresholds.update(logits)
            budget -= logits.numel() * logits.element_size()
            cache.append(logits.cpu() if budget > 0 else None)
        dist.all_reduce_sum(thresholds.histogram)  # merged thresholds: identical on every rank
        class_thresholds = thresholds.compute()
        covered = torch.zeros(2, dtype=torch.int64, device=self.device)  # labelled pixels, all pixels
        second_pass = loader if any(c is None for c in cache) else [None] * len(cache)
        for index, (batch, cached) in enumerate(zip(second_pass, cache)):
            logits = self._to_device(cached) if cached is not None else self._full_logits(model, batch["image"])
            labels = protocl.static_pseudo_label(logits, class_thresholds=class_thresholds, proportion=a.proportion)
            covered += labelled_and_total(labels)
            Image.fromarray(labels[0].to(torch.uint8).cpu().numpy()).save(tmp / f"{shard[index].name}.png")
        dist.all_reduce_sum(covered)
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            marker.write_text(json.dumps({"class_thresholds": class_thresholds.tolist()}))
        dist.barrier()
        model.train()
        finite = class_thresholds[torch.isfinite(class_thresholds)]
        self.log(f"round {round_index}: static labels for {len(self.target_train)} target images, coverage "
                 f"{100 * float(covered[0]) / max(1, int(covered[1])):.1f}%, class thresholds median "
                 f"{float(finite.median()) if finite.numel() else float('nan'):.3f} ({finite.numel()} classes seen)")
        return class_thresholds.tolist()

    def _full_logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """fp32 logits of ``images`` (uint8, any device) upsampled to their size."""
        images = self._to_device(images)
        logits, _ = self._forward(model, images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ stage 2
    def _adapt_step(self, src: dict[str, Tensor], tgt: dict[str, Tensor] | None) -> dict[str, Tensor]:
        """One stage-2 step on a source and a target batch; ``tgt=None`` is the source-only control step."""
        control = tgt is None
        b = src["image"].shape[0]
        images = self._to_device(src["image"])
        if tgt is not None:
            images = torch.cat([images, self._to_device(tgt["image"])])
        y_s = self._to_device(src["label"]).long()
        logits, features = self._forward(self.ddp, images)
        up = F.interpolate(logits, size=y_s.shape[-2:], mode="bilinear", align_corners=False)
        ce_src = safe_cross_entropy(up[:b], y_s)
        if control:  # source-only control with the same schedule: no target term at all
            self._optimize(ce_src)
            return {"ce_src": ce_src.detach()}
        up_t = up[b:]
        y_f = self._to_device(tgt["static"]).long()
        if self.uses_contrast:
            out = self.contrast(features[:b], y_s, features[b:], y_f)
            y_d, y_t, contrast_loss, fcl, bcl = out.dynamic_labels, out.target_labels, out.loss, out.fcl, out.bcl
            if self.args.gate_dynamic == "prediction":  # a dynamic label counts only where the classifier agrees
                y_t = gate_dynamic(y_f, y_t, up_t.detach().argmax(1))
            elif self.args.gate_dynamic == "agreement":  # only classes whose dynamic labels agree with static ones
                y_t = gate_by_agreement(y_f, y_d, y_t, self.num_classes)
            elif self.args.gate_dynamic == "either":  # agreement, or the classifier's own prediction
                y_t = gate_by_agreement(y_f, y_d, y_t, self.num_classes, prediction=up_t.detach().argmax(1))
        else:  # --no-contrastive --no-dynamic: self-training on the static labels, protocl's step not run at all
            y_d, y_t = torch.full_like(y_f, IGNORE), y_f
            contrast_loss = fcl = bcl = torch.zeros((), device=self.device)
        ce_tgt = safe_cross_entropy(up_t, y_t)
        ent = protocl.entropy_loss(up[:b]) + 0.3 * protocl.entropy_loss(up_t)
        loss = ce_src + 0.3 * ce_tgt + 0.4 * ent + contrast_loss
        self._optimize(loss)
        stats = {"ce_src": ce_src.detach(), "ce_tgt": ce_tgt.detach(), "ent": ent.detach(),
                 "fcl": fcl.detach(), "bcl": bcl.detach()}
        for name, labels in zip(LABEL_KINDS, (y_f, y_d, y_t)):
            stats[f"cov_{name}"] = torch.count_nonzero(labels != IGNORE) * (100.0 / labels.numel())
        if self.args.diagnostics:  # opt-in: target ground truth, a logged diagnostic, never trained on
            gt = self._to_device(tgt["label"]).long()
            for i, labels in enumerate((y_f, y_d, y_t)):
                self.diag[i] += class_counts(labels, gt, self.num_classes)
        return stats

    def adapt(self, control: bool = False) -> bool:
        a, s = self.args, self.state
        while s.round < a.rounds:
            if not control:
                s.thresholds = self.generate_static_labels(s.round)
                self.target_set.pseudo_dir = self._pseudo_dir(s.round)
                self.target_stream.restart()
            self._check_next = True  # new static labels: check their values on the round's first step
            sums: dict[str, Tensor] = {}
            while s.iteration < a.round_iters:
                set_lr(self.optimizer, 0.5 ** s.round * (1 - s.iteration / a.round_iters) ** 0.9)
                src = next(self.source_stream)  # host-side data loading, before the step
                tgt = None if control else next(self.target_stream)  # the control never looks at the target
                with self._step_scope("control" if control else "adapt"):
                    for k, v in self._adapt_step(src, tgt).items():
                        sums[k] = sums.get(k, 0) + v
                s.iteration += 1
                if s.iteration % a.log_every == 0 or s.iteration == a.round_iters:
                    n = a.log_every if s.iteration % a.log_every == 0 else s.iteration % a.log_every
                    means = {k: float(v) / n for k, v in sums.items()}  # the only host read of the losses
                    self._log_adapt(means, control)
                    sums = {}
                if self._stop_requested():
                    return False
                if s.iteration % a.ckpt_every == 0 and s.iteration < a.round_iters:
                    self.save()
            label = f"{'control' if control else 'adapted'} round {s.round}"
            result = self._evaluate(label, control=control)
            if not control:
                s.metrics.setdefault("rounds", []).append({"round": s.round, "miou": result["miou"]})
                if a.diagnostics:
                    self._round_diagnostics()
                if self.rank == 0:
                    self.panel(s.round)
            s.round, s.iteration = s.round + 1, 0
            self.diag.zero_()
            if s.round < a.rounds:
                self.save()
        s.metrics["source_only_continued" if control else "adapted"] = result
        return True

    def _round_diagnostics(self) -> None:
        """Store and log the round's per-class coverage and precision of static, dynamic and hybrid labels."""
        s = self.state
        counts = self._reduced_diag()
        entry = {"round": s.round}
        for i, name in enumerate(LABEL_KINDS):
            entry[name] = diagnostics_summary(counts[i])
        s.metrics.setdefault("diagnostics", []).append(entry)
        lines = ["| class | " + " | ".join(f"{n} cov / prec" for n in LABEL_KINDS) + " |",
                 "|---|" + "---:|" * len(LABEL_KINDS)]
        for k, cname in enumerate(CLASS_NAMES):
            if entry["static"]["counts"]["gt"][k] or any(entry[n]["counts"]["labelled"][k] for n in LABEL_KINDS):
                cells = [f"{_pct(entry[n]['coverage'][k])} / {_pct(entry[n]['precision'][k])}" for n in LABEL_KINDS]
                lines.append(f"| {cname} | " + " | ".join(cells) + " |")
        lines.append("| **class mean** | " + " | ".join(
            f"**{_pct(entry[n]['class_mean_coverage'])} / {_pct(entry[n]['class_mean_precision'])}**"
            for n in LABEL_KINDS) + " |")
        lines.append("| pixels | " + " | ".join(
            f"{_pct(entry[n]['pixel_coverage'])} / {_pct(entry[n]['pixel_precision'])}" for n in LABEL_KINDS) + " |")
        self.log(f"round {s.round}: pseudo labels on the round's target crops against target ground truth "
                 "(coverage = labelled share of the class's pixels, precision = correct share of the pixels "
                 "labelled with the class; %, diagnostic only):\n" + "\n".join(lines))

    def _log_adapt(self, means: dict[str, float], control: bool) -> None:
        s, h = self.state, self.state.history
        losses = " ".join(f"{k} {means[k]:.3f}" for k in ("ce_src", "ce_tgt", "ent", "fcl", "bcl") if k in means)
        line = f"{self._progress()} | {'control' if control else 'stage 2'} round {s.round} it {s.iteration} | {losses}"
        if not control:
            line += (" | coverage static/dynamic/hybrid "
                     f"{means['cov_static']:.0f}/{means['cov_dynamic']:.0f}/{means['cov_hybrid']:.0f}%")
            if self.args.diagnostics:
                counts = self._reduced_diag()
                summary = {n: diagnostics_summary(counts[i]) for i, n in enumerate(LABEL_KINDS)}
                line += " | class-mean coverage/precision " + " ".join(
                    f"{n} {_pct(v['class_mean_coverage'])}/{_pct(v['class_mean_precision'])}"
                    for n, v in summary.items()) + "% (round so far, target GT, diagnostic only)"
                for n, v in summary.items():
                    means[f"class_mean_coverage_{n}"] = v["class_mean_coverage"]
                    means[f"class_mean_precision_{n}"] = v["class_mean_precision"]
            h["log_iter"].append(self._done_iters() - self.args.source_iters)
            for name in LABEL_KINDS:
                h[f"coverage_{name}"].append(means[f"cov_{name}"])
        self.log(line)
        self._scalars("control" if control else "train", means)

    @torch.no_grad()
    def panel(self, round_index: int, count: int = 4) -> None:
        """Image | static | dynamic | hybrid | ground truth for the first target train images (the ground truth
        column only with ``--diagnostics``: without it, target train labels are never read).

        Dynamic and hybrid labels come from the orchestrator itself (``update=False``), as in training: per-image
        prototypes of a paired source image (source train image i for target image i, at the same short-side
        size), calibrated by the EMA domain bias, matched with the target features and fused with the static
        labels.
        """
        a = self.args
        self.model.eval()
        rows = []
        for i, sample in enumerate(self.target_train[:count]):
            size = pseudo_label_size(sample, a.resize)
            image = np.asarray(Image.open(sample.image).convert("RGB").resize(size, Image.BILINEAR))
            static = torch.from_numpy(np.asarray(Image.open(self._pseudo_dir(round_index) / f"{sample.name}.png"))
                                      .astype(np.int64))[None].to(self.device)
            paired = self.source_set.samples[i % len(self.source_set)]
            src_size = pseudo_label_size(paired, a.resize)
            src_image = np.asarray(Image.open(paired.image).convert("RGB").resize(src_size, Image.BILINEAR))
            with Image.open(paired.image) as full:
                src_label = Image.fromarray(read_sample_label(paired, full.size)).resize(src_size, Image.NEAREST)
            y_s = torch.from_numpy(np.asarray(src_label).astype(np.int64))[None].to(self.device)
            _, f_s = self._forward(self.model, _as_batch(src_image, self.device))
            _, f_t = self._forward(self.model, _as_batch(image, self.device))
            out = self.contrast(f_s, y_s, f_t, static, update=False)
            gt = (_read_gt(sample, image.shape[1::-1]) if sample.label and a.diagnostics  # opt-in, as for the log
                  else np.full(static.shape[-2:], IGNORE, np.uint8))
            rows.append({"image": image, "static": static[0].cpu().numpy(),
                         "dynamic": out.dynamic_labels[0].cpu().numpy(), "hybrid": out.target_labels[0].cpu().numpy(),
                         "gt": gt})
        self.model.train()
        figures.pseudo_label_panel(rows, self.out / "figures" / f"pseudo_labels_round_{round_index:02d}.png")

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        a, s = self.args, self.state
        self._t0, self._it0 = time.time(), self._done_iters()
        self.log(f"{self.world} process(es) on {self.device}; source ({a.source}) {len(self.source_set)} images, "
                 f"target train {len(self.target_train)}, target val {len(self.target_val)}; arch {a.arch}, "
                 f"D={self.model.feature_dim}, amp {a.amp}")
        if a.sync_debug and self.device.type != "cuda":
            self.log("note: --sync-debug has an effect on CUDA only")
        checks_before = protocl.value_checks_enabled()
        try:
            return self._run_stages()
        finally:
            protocl.set_value_checks(checks_before)
            if self.tb is not None:
                self.tb.close()

    def _run_stages(self) -> int:
        a, s = self.args, self.state
        if s.stage == "source" and not self.train_source():
            return 1
        if s.stage == "adapt":
            self._check_next = True
            if not self.adapt():
                return 1
            if self.rank == 0:
                checkpoint.save_atomic({"model": self.model.state_dict(), "config": vars(a).copy()},
                                       self.out / "adapted.pt")
            if a.control:
                s.stage, s.round, s.iteration = "control", 0, 0
                self.model.load_state_dict(checkpoint.load(self.out / "source_only.pt")["model"])
                self.optimizer = self._new_optimizer(a.lr)
                self.save()
            else:
                s.stage = "done"
        if s.stage == "control":
            if not self.adapt(control=True):
                return 1
            s.stage = "done"
        self.finish()
        return 0

    def finish(self) -> None:
        a, s = self.args, self.state
        self.save()
        if self.rank != 0:
            return
        metrics = {k: s.metrics[k] for k in ("source_only", "adapted", "source_only_continued", "rounds",
                                             "diagnostics") if k in s.metrics}
        metrics["config"] = {k: v for k, v in vars(a).items() if k not in ("stop_after",)}
        metrics["class_names"] = list(CLASS_NAMES)
        if self.subsets:
            metrics["class_subsets"] = {n: [CLASS_NAMES[k] for k in ks] for n, ks in self.subsets.items()}
        with open(self.out / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=2, default=str)
        figures.training_curves(s.history, self.out / "figures" / "training_curves.png")
        columns = {"source-only": metrics["source_only"]["iou"], "adapted": metrics["adapted"]["iou"]}
        if "source_only_continued" in metrics:
            columns["source-only, same budget"] = metrics["source_only_continued"]["iou"]
        what = "16-class protocol, n/a = not among the 16" if self.subsets else "19 classes"
        self.log(f"per-class IoU on target val (%, {what}):\n" + iou_table(columns, CLASS_NAMES))
        if "source_only_continued" in metrics:
            self.log(f"source-only trained for the same total iterations ({a.source_iters} + "
                     f"{a.rounds * a.round_iters}): {metrics['source_only_continued']['miou']:.2f}")
        if self.subsets:
            self.log("target mIoU over 16 classes (13 classes): source-only "
                     f"{metrics['source_only']['miou16']:.2f} ({metrics['source_only']['miou13']:.2f}) -> adapted "
                     f"{metrics['adapted']['miou16']:.2f} ({metrics['adapted']['miou13']:.2f})")
        print(f"target mIoU: source-only {metrics['source_only']['miou']:.2f} -> adapted "
              f"{metrics['adapted']['miou']:.2f}", flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(f"target mIoU: source-only {metrics['source_only']['miou']:.2f} -> adapted "
                    f"{metrics['adapted']['miou']:.2f}\n")
        sys.stdout.flush()


def _pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def _as_batch(image: np.ndarray, device: torch.device) -> Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) uint8 on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None].to(device)


def _read_gt(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """Train-id ground truth of ``sample`` nearest-resized to ``size`` = (W, H) (for the figure only)."""
    with Image.open(sample.image) as image:
        full = read_sample_label(sample, image.size)
    return np.asarray(Image.fromarray(full).resize(size, Image.NEAREST))
