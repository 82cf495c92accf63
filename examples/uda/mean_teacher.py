r"""The run parts of the DAFormer-class recipe (``examples/train_daformer.py``; the maths is :mod:`uda.teacher`,
:mod:`uda.mix`, :mod:`uda.rare_class`, :mod:`uda.schedule`):

- :func:`train_sets`: source crops with rare-class sampling and DAFormer's ``cat_max_ratio`` box rule
  (:class:`SourceCrops`; the class statistics are counted once and cached in ``<out>/rcs_stats.json``, so a
  resumed run samples from the same table), target crops that never open a target label;
- :func:`thing_classes`: the feature distance's classes, by name from the run's class table;
- :func:`frozen_encoder`: the initial encoder, frozen (the feature distance's ImageNet features);
- :func:`step_generators`: the step's random draws (mix classes, jitter, blur, MIC mask) as a pure function of
  (seed, rank, step), so a resumed run draws what the uninterrupted one drew;
- :func:`pixel_mean_ce`: mmseg 0.16's decode-head cross-entropy, which DAFormer trains with.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from . import dist, preflight
from .classes import ClassTable
from .labels import read_sample_label
from .loading import TrainSet, pad_to_crop
from .rare_class import RareClassSampler, RareClassStats, class_pixel_counts, crop_with_class, random_crop_origin

__all__ = ["SourceCrops", "train_sets", "source_stats", "thing_classes", "frozen_encoder", "step_generators",
           "pixel_mean_ce", "STATS_FILE", "CITYSCAPES_THING_NAMES"]

STATS_FILE = "rcs_stats.json"
CAT_MAX_RATIO = 0.75  # DAFormer's source crops: the largest class under 75% of the crop (source labels only)
CITYSCAPES_THING_NAMES = ("traffic light", "traffic sign", "person", "rider", "car", "truck", "bus", "train",
                          "motorcycle", "bicycle")  # DAFormer's imnet_feature_dist_classes [6, 7, 11, ..., 18]


class SourceCrops(TrainSet):
    r"""Source training crops as DAFormer draws them: with a ``sampler`` (rare-class sampling) the file is the
    sampler's draw for the item's place in the stream (its augmentation ``seed`` and index: a pure function,
    so a resume is exact) and the crop is re-drawn until it holds the drawn class
    (:func:`uda.rare_class.crop_with_class`); without, the stream's file and mmseg's ``RandomCrop`` with
    ``cat_max_ratio`` (:func:`uda.rare_class.random_crop_origin`). Both read the **source** labels only."""

    def __init__(self, samples, *, sampler: RareClassSampler | None, min_crop_ratio: float = 0.5,
                 cat_max_ratio: float = CAT_MAX_RATIO, **kwargs) -> None:
        super().__init__(samples, labels=True, **kwargs)
        self.sampler, self.min_crop_ratio, self.cat_max_ratio = sampler, min_crop_ratio, cat_max_ratio
        self._wanted: int | None = None

    def _load(self, index: int, seed: int) -> dict[str, Tensor]:
        self._wanted = None
        if self.sampler is not None:  # another index (a skipped bad file) is another draw
            draw = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
            self._wanted, index = self.sampler.sample(draw)
        return super()._load(index, seed)

    def crop_window(self, arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        arrays = pad_to_crop(arrays, self.crop)
        label, crop = arrays[1], (self.crop, self.crop)
        if self._wanted is None:
            top, left = random_crop_origin(label.shape, crop, rng, label=label, cat_max_ratio=self.cat_max_ratio)
        else:
            top, left = crop_with_class(label, crop, self._wanted, rng=rng, min_pixels=self.sampler.min_pixels,
                                        min_crop_ratio=self.min_crop_ratio, cat_max_ratio=self.cat_max_ratio)
        return [a[top:top + self.crop, left:left + self.crop] for a in arrays]


def train_sets(args, source: Sequence, target_train: Sequence, table: ClassTable, out: Path, rank: int,
               log: Callable[[str], None]) -> tuple[SourceCrops, TrainSet]:
    """The recipe's source crops (rare-class sampling unless ``--rcs-temperature 0``; resized to
    ``--source-resize``) and target crops (``--resize``; uniform windows, no label opened)."""
    bad = args.on_bad_sample
    sampler = None
    if args.rcs_temperature > 0:
        stats = source_stats(out, source, table.num_classes, rank=rank, log=log)
        sampler = RareClassSampler(stats, temperature=args.rcs_temperature, min_pixels=args.rcs_min_pixels,
                                   seed=args.seed)
        log("rare-class sampling: class probabilities " + ", ".join(
            f"{name} {p:.3f}" for name, p in zip(table.names, sampler.probabilities) if p > 0))
    source_set = SourceCrops(source, sampler=sampler, min_crop_ratio=args.rcs_min_crop_ratio,
                             resize=args.source_resize, crop=args.crop, scales=(1.0,), on_bad_sample=bad)
    target_set = TrainSet(target_train, resize=args.resize, crop=args.crop, scales=(1.0,), on_bad_sample=bad,
                          labels=False)  # a target crop never reads a target label (DAFormer#6)
    return source_set, target_set


def _count(sample, num_classes: int) -> np.ndarray:
    with Image.open(sample.image) as image:
        size = image.size
    return class_pixel_counts(read_sample_label(sample, size), num_classes)


def source_stats(out: Path, samples: Sequence, num_classes: int, *, rank: int = 0,
                 log: Callable[[str], None] = print) -> RareClassStats:
    """The source's per-file class pixel counts: ``<out>/rcs_stats.json`` when it holds these files and K (a
    resumed run), else counted by rank 0 (one read of every source label, in worker processes) and cached there;
    the other ranks wait and read the file."""
    path, files = out / STATS_FILE, [str(s.label) for s in samples]

    def cached() -> RareClassStats | None:
        if not path.is_file():
            return None
        try:
            stats = RareClassStats.load(path)
        except ValueError as error:
            log(f"note: {path} is not usable ({error}): counting again")
            return None
        if list(stats.files) != files or stats.num_classes != num_classes:
            log(f"note: {path} describes other files or K={stats.num_classes}: counting again")
            return None
        return stats

    stats = cached()
    if stats is None and rank == 0:
        workers = preflight.default_workers()
        if workers > 1 and len(samples) > 64:
            with ProcessPoolExecutor(workers) as pool:
                rows = list(pool.map(_count, samples, [num_classes] * len(samples), chunksize=16))
        else:
            rows = [_count(s, num_classes) for s in samples]
        stats = RareClassStats(tuple(files), np.asarray(rows, dtype=np.int64).reshape(len(rows), num_classes))
        stats.save(path)
        log(f"rare-class sampling: class pixel counts of {len(files)} source labels cached in {path}")
    dist.barrier()
    return stats if stats is not None else RareClassStats.load(path)


def thing_classes(names: Sequence[str] | None, table: ClassTable) -> tuple[int, ...]:
    """The feature distance's classes as indices into ``table``: ``names`` (``--thing-classes``), or those of
    Cityscapes' ten things the table has. ``ValueError`` naming a name the table does not have."""
    if names:
        missing = [n for n in names if n not in table.names]
        if missing:
            raise ValueError(f"expected --thing-classes among the class table's names {list(table.names)}, got "
                             f"{missing}")
    wanted = set(names or CITYSCAPES_THING_NAMES)
    return tuple(i for i, name in enumerate(table.names) if name in wanted)


def frozen_encoder(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model.backbone`` in evaluation mode: the initial (ImageNet) encoder of the feature
    distance (DAFormer's ``imnet_model``)."""
    return copy.deepcopy(model.backbone).eval().requires_grad_(False)


def step_generators(seed: int, rank: int, step: int, device: torch.device) -> tuple[random.Random, torch.Generator]:
    """The step's host generator (jitter and blur decisions) and device generator (ClassMix classes, MIC mask):
    seeded by ``(seed, rank, step)`` alone."""
    host, dev = np.random.SeedSequence([seed, rank, step, 0xDAF]).generate_state(2)
    generator = torch.Generator(device=device)
    generator.manual_seed(int(dev))
    return random.Random(int(host)), generator


def pixel_mean_ce(logits: Tensor, labels: Tensor, weight: Tensor | None = None, ignore_index: int = 255) -> Tensor:
    r"""mmseg 0.16's decode-head loss, as DAFormer trains: the logits resized bilinearly to the labels' size,
    the per-pixel cross-entropy (0 at ``ignore_index``), times ``weight`` (the pseudo-label weight), averaged
    over **all** B·H·W pixels, ignored ones included (mmseg's ``weight_reduce_loss`` without ``avg_factor``).

    Shape: logits ``(B, K, h, w)``, labels ``(B, H, W)`` int64, weight ``(B, H, W)`` or None; returns a scalar."""
    up = F.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(up, labels, ignore_index=ignore_index, reduction="none")
    return (loss if weight is None else loss * weight).mean()
