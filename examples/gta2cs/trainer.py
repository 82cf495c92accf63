r"""The two training stages of the reference pipeline (protocl method spec §4).

Stage 1 trains on labelled source crops (cross-entropy) and keeps the last weights. Stage 2 adapts in rounds:
at the start of each round static pseudo labels are regenerated over the target train split
(:class:`protocl.ClassBalancedThresholds` + :func:`protocl.static_pseudo_label`) and written to disk; every
step the orchestrator :class:`protocl.BidirectionalContrast` turns them into hybrid labels and returns the
FCL + BCL loss; the step loss is

    CE(source) + 0.3·CE(target, y_T) + 0.4·(H(source) + 0.3·H(target)) + λ_FCL·FCL + λ_BCL·BCL.

All state lives in :class:`RunState` and the checkpoint, so ``--resume`` continues bit for bit.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
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
    BatchStream,
    EvalSet,
    PseudoLabelSet,
    Sample,
    TrainSet,
    cityscapes_files,
    gta5_files,
    pseudo_label_size,
    read_label,
)
from .evaluate import evaluate, iou_table
from .model import build_model

SOURCE_STREAM, TARGET_STREAM = 0, 1


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


def poly_lr(base: float, iteration: int, total: int, power: float = 0.9) -> float:
    return base * (1 - iteration / max(1, total)) ** power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Set every group's lr to ``base_lr * factor`` (the classifier group has a 10x base)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor


class Trainer:
    """Builds data, model, optimizer and the orchestrator from ``args`` and runs (or resumes) both stages."""

    def __init__(self, args) -> None:
        self.args = args
        self.rank, self.world, self.device = dist.setup(args.device)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out, self.rank)
        checkpoint.seed_everything(args.seed)
        self.num_classes = len(CLASS_NAMES)
        source = gta5_files(args.gta5_root)
        self.target_train = cityscapes_files(args.cityscapes_root, "train", require_labels=False)
        self.target_val = cityscapes_files(args.cityscapes_root, "val")
        scales = tuple(args.scales)
        self.source_set = TrainSet(source, resize=args.resize, crop=args.crop, scales=scales)
        self.target_set = TrainSet(self.target_train, resize=args.resize, crop=args.crop, scales=scales)
        stream_kw = {"seed": args.seed, "rank": self.rank, "world": self.world, "workers": args.workers}
        self.source_stream = BatchStream(self.source_set, args.batch_size, stream=SOURCE_STREAM, **stream_kw)
        self.target_stream = BatchStream(self.target_set, args.batch_size, stream=TARGET_STREAM, **stream_kw)
        val_shard = self.target_val[self.rank::self.world]
        self.val_loader = DataLoader(EvalSet(val_shard, size=tuple(args.eval_size)), batch_size=1,
                                     num_workers=min(args.workers, 2))
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
        self.optimizer = self._new_optimizer(args.source_lr)
        self.state = RunState()
        self.total_iters = args.source_iters + args.rounds * args.round_iters + (
            args.rounds * args.round_iters if args.control else 0)
        self._t0, self._it0 = time.time(), 0

    # ------------------------------------------------------------------ helpers
    def _new_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.param_groups(lr), lr=lr, momentum=0.9, weight_decay=5e-4)

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

    def checkpoint_state(self) -> dict:
        return {
            "state": self.state.__dict__.copy(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "contrast": self.contrast.state_dict(),
            "streams": {"source": self.source_stream.state_dict(), "target": self.target_stream.state_dict()},
            "rng": checkpoint.rng_state(), "config": vars(self.args).copy(), "world_size": self.world,
        }

    def save(self, name: str = "checkpoint.pt") -> None:
        if self.rank == 0:
            checkpoint.save_atomic(self.checkpoint_state(), self.out / name)
        dist.barrier()

    def resume(self, path: str) -> None:
        ckpt = checkpoint.load(path)
        self.state = RunState(**ckpt["state"])
        self.model.load_state_dict(ckpt["model"])
        if self.state.stage in ("adapt", "control"):
            self.optimizer = self._new_optimizer(self.args.lr)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.contrast.load_state_dict(ckpt["contrast"])
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
        result = evaluate(self.model, self.val_loader, self.num_classes, self.device)
        h, s, a = self.state.history, self.state, self.args
        if control:  # plotted at the iteration count it matches (same budget as the adapted model)
            h.setdefault("control_iter", []).append(a.source_iters + s.round * a.round_iters + s.iteration)
            h.setdefault("control_miou", []).append(result["miou"])
        else:
            h["eval_iter"].append(self._done_iters())
            h["eval_miou"].append(result["miou"])
        self.log(f"eval {label}: target val mIoU {result['miou']:.2f}")
        return result

    # ------------------------------------------------------------------ stage 1
    def _source_step(self) -> dict[str, Tensor]:
        batch = next(self.source_stream)
        images, labels = batch["image"].to(self.device), batch["label"].to(self.device)
        logits, _ = self.ddp(images)
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = safe_cross_entropy(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"ce_src": loss.detach()}

    def train_source(self) -> bool:
        a, s = self.args, self.state
        sums: dict[str, Tensor] = {}
        while s.iteration < a.source_iters:
            set_lr(self.optimizer, (1 - s.iteration / a.source_iters) ** 0.9)
            for k, v in self._source_step().items():
                sums[k] = sums.get(k, 0) + v
            s.iteration += 1
            if s.iteration % a.log_every == 0 or s.iteration == a.source_iters:
                n = a.log_every if s.iteration % a.log_every == 0 else s.iteration % a.log_every
                self.log(f"{self._progress()} | stage 1 it {s.iteration} | "
                         + " ".join(f"{k} {float(v) / n:.3f}" for k, v in sums.items()))
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
        loader = DataLoader(PseudoLabelSet(shard, resize=a.resize), batch_size=1, num_workers=min(a.workers, 2))
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
        covered = torch.zeros(2, dtype=torch.float64, device=self.device)
        second_pass = loader if any(c is None for c in cache) else [None] * len(cache)
        for index, (batch, cached) in enumerate(zip(second_pass, cache)):
            logits = cached.to(self.device) if cached is not None else self._full_logits(model, batch["image"])
            labels = protocl.static_pseudo_label(logits, class_thresholds=class_thresholds, proportion=a.proportion)
            covered += torch.stack([(labels != IGNORE).sum(), torch.tensor(labels.numel())]).to(covered)
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
                 f"{100 * float(covered[0] / covered[1]):.1f}%, class thresholds median "
                 f"{float(finite.median()) if finite.numel() else float('nan'):.3f} ({finite.numel()} classes seen)")
        return class_thresholds.tolist()

    def _full_logits(self, model: nn.Module, images: Tensor) -> Tensor:
        images = images.to(self.device)
        logits, _ = model(images)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    # ------------------------------------------------------------------ stage 2
    def _adapt_step(self, control: bool) -> dict[str, Tensor]:
        src, tgt = next(self.source_stream), next(self.target_stream)
        images = torch.cat([src["image"], tgt["image"]]).to(self.device)
        y_s, y_f = src["label"].to(self.device), tgt["static"].to(self.device)
        logits, features = self.ddp(images)
        b = src["image"].shape[0]
        up = F.interpolate(logits, size=y_s.shape[-2:], mode="bilinear", align_corners=False)
        up_s, up_t = up[:b], up[b:]
        ce_src = safe_cross_entropy(up_s, y_s)
        if control:  # source-only control with the same schedule: no target term at all
            loss, stats = ce_src, {"ce_src": ce_src.detach()}
        else:
            out = self.contrast(features[:b], y_s, features[b:], y_f)
            ce_tgt = safe_cross_entropy(up_t, out.target_labels)
            ent = protocl.entropy_loss(up_s) + 0.3 * protocl.entropy_loss(up_t)
            loss = ce_src + 0.3 * ce_tgt + 0.4 * ent + out.loss
            stats = {"ce_src": ce_src.detach(), "ce_tgt": ce_tgt.detach(), "ent": ent.detach(),
                     "fcl": out.fcl.detach(), "bcl": out.bcl.detach()}
            stats.update(self._label_stats(y_f, out.dynamic_labels, out.target_labels, tgt["label"].to(self.device)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return stats

    @staticmethod
    @torch.no_grad()
    def _label_stats(static: Tensor, dynamic: Tensor, hybrid: Tensor, gt: Tensor) -> dict[str, Tensor]:
        """Coverage and precision (against target ground truth: a logged diagnostic, never trained on)."""
        stats = {}
        known = gt != IGNORE
        for name, labels in (("static", static), ("dynamic", dynamic), ("hybrid", hybrid)):
            labelled = labels != IGNORE
            stats[f"cov_{name}"] = labelled.float().mean() * 100
            checked = (labelled & known).sum()
            stats[f"prec_{name}"] = ((labels == gt) & labelled & known).sum() / checked.clamp_min(1) * 100
        return stats

    def adapt(self, control: bool = False) -> bool:
        a, s = self.args, self.state
        while s.round < a.rounds:
            if not control:
                s.thresholds = self.generate_static_labels(s.round)
                self.target_set.pseudo_dir = self._pseudo_dir(s.round)
                self.target_stream.restart()
            sums: dict[str, Tensor] = {}
            while s.iteration < a.round_iters:
                set_lr(self.optimizer, 0.5 ** s.round * (1 - s.iteration / a.round_iters) ** 0.9)
                for k, v in self._adapt_step(control).items():
                    sums[k] = sums.get(k, 0) + v
                s.iteration += 1
                if s.iteration % a.log_every == 0 or s.iteration == a.round_iters:
                    n = a.log_every if s.iteration % a.log_every == 0 else s.iteration % a.log_every
                    means = {k: float(v) / n for k, v in sums.items()}
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
                if self.rank == 0:
                    self.panel(s.round)
            s.round, s.iteration = s.round + 1, 0
            if s.round < a.rounds:
                self.save()
        s.metrics["source_only_continued" if control else "adapted"] = result
        return True

    def _log_adapt(self, means: dict[str, float], control: bool) -> None:
        s, h = self.state, self.state.history
        losses = " ".join(f"{k} {means[k]:.3f}" for k in ("ce_src", "ce_tgt", "ent", "fcl", "bcl") if k in means)
        line = f"{self._progress()} | {'control' if control else 'stage 2'} round {s.round} it {s.iteration} | {losses}"
        if not control:
            line += (" | coverage static/dynamic/hybrid "
                     f"{means['cov_static']:.0f}/{means['cov_dynamic']:.0f}/{means['cov_hybrid']:.0f}% "
                     f"precision {means['prec_static']:.0f}/{means['prec_dynamic']:.0f}/{means['prec_hybrid']:.0f}% "
                     "(target GT, diagnostic only)")
            h["log_iter"].append(self._done_iters() - self.args.source_iters)
            for name in ("static", "dynamic", "hybrid"):
                h[f"coverage_{name}"].append(means[f"cov_{name}"])
        self.log(line)

    @torch.no_grad()
    def panel(self, round_index: int, count: int = 4) -> None:
        """Image | static | dynamic | hybrid | ground truth for the first target train images."""
        a, c = self.args, self.contrast
        self.model.eval()
        rows = []
        for sample in self.target_train[:count]:
            size = pseudo_label_size(sample, a.resize)
            image = np.asarray(Image.open(sample.image).convert("RGB").resize(size, Image.BILINEAR))
            static = torch.from_numpy(np.asarray(Image.open(self._pseudo_dir(round_index) / f"{sample.name}.png"))
                                      .astype(np.int64))[None].to(self.device)
            _, features = self.model(torch.from_numpy(image.transpose(2, 0, 1).copy())[None].to(self.device))
            prototypes = c.source_ema.prototypes
            if not a.no_calibration:
                prototypes = protocl.domain_bias_calibrate(prototypes, c.source_ema, c.target_ema)
            dynamic = protocl.dynamic_pseudo_label(features, prototypes, valid=c.source_ema.initialized,
                                                   threshold=a.threshold, size=tuple(static.shape[-2:]))
            hybrid = static if a.no_dynamic else protocl.hybrid_fuse(static, dynamic, mode=a.fuse)
            gt = (_read_gt(sample, image.shape[1::-1]) if sample.label
                  else np.full(static.shape[-2:], IGNORE, np.uint8))
            rows.append({"image": image, "static": static[0].cpu().numpy(), "dynamic": dynamic[0].cpu().numpy(),
                         "hybrid": hybrid[0].cpu().numpy(), "gt": gt})
        self.model.train()
        figures.pseudo_label_panel(rows, self.out / "figures" / f"pseudo_labels_round_{round_index:02d}.png")

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        a, s = self.args, self.state
        self._t0, self._it0 = time.time(), self._done_iters()
        self.log(f"{self.world} process(es) on {self.device}; source {len(self.source_set)} images, target train "
                 f"{len(self.target_train)}, target val {len(self.target_val)}; arch {a.arch}, D={self.model.feature_dim}")
        if s.stage == "source" and not self.train_source():
            return 1
        if s.stage == "adapt":
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
        metrics = {k: s.metrics[k] for k in ("source_only", "adapted", "source_only_continued", "rounds")
                   if k in s.metrics}
        metrics["config"] = {k: v for k, v in vars(a).items() if k not in ("stop_after",)}
        metrics["class_names"] = list(CLASS_NAMES)
        with open(self.out / "metrics.json", "w") as f:
            json.dump(metrics, f, indent=2, default=str)
        figures.training_curves(s.history, self.out / "figures" / "training_curves.png")
        columns = {"source-only": metrics["source_only"]["iou"], "adapted": metrics["adapted"]["iou"]}
        if "source_only_continued" in metrics:
            columns["source-only, same budget"] = metrics["source_only_continued"]["iou"]
        self.log("per-class IoU on target val (%):\n" + iou_table(columns, CLASS_NAMES))
        if "source_only_continued" in metrics:
            self.log(f"source-only trained for the same total iterations ({a.source_iters} + "
                     f"{a.rounds * a.round_iters}): {metrics['source_only_continued']['miou']:.2f}")
        print(f"target mIoU: source-only {metrics['source_only']['miou']:.2f} -> adapted "
              f"{metrics['adapted']['miou']:.2f}", flush=True)
        with open(self.out / "log.txt", "a") as f:
            f.write(f"target mIoU: source-only {metrics['source_only']['miou']:.2f} -> adapted "
                    f"{metrics['adapted']['miou']:.2f}\n")
        sys.stdout.flush()


def _read_gt(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """Train-id ground truth of ``sample`` nearest-resized to ``size`` = (W, H) (for the figure only)."""
    with Image.open(sample.image) as image:
        full = read_label(sample.label, image.size)
    return np.asarray(Image.fromarray(full).resize(size, Image.NEAREST))
