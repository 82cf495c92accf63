"""Dark Zurich (Sakaridis et al. 2019): ``<root>/rgb_anon/{train,val,test}/night/<sequence>/<stem>_rgb_anon.png``
(train: the unlabelled target images; test: no public labels) with the val labels
``<root>/gt/val/night/<sequence>/<stem>_gt_labelTrainIds.png`` (train ids, as ACDC's). The train split's ``day``
and ``twilight`` folders are not read (``time_of_day``). A target dataset."""

from __future__ import annotations

from pathlib import Path

from .base import Sample, check_root, rgb_anon_samples, unique_names

DARKZURICH_SPLITS = ("train", "val", "test")
LAYOUT = ("<root>/rgb_anon/{train,val,test}/night/<sequence>/*_rgb_anon.png and "
          "<root>/gt/val/night/<sequence>/*_gt_labelTrainIds.png")


def darkzurich_files(root: str | Path, split: str, *, time_of_day: str = "night",
                     require_labels: bool | None = None) -> list[Sample]:
    """Dark Zurich samples of ``split``; ``require_labels`` defaults to on for val only (Dark Zurich has no train
    labels, and its test labels are not public)."""
    root = check_root(root, "--darkzurich-root", "Dark Zurich", LAYOUT)
    if split not in DARKZURICH_SPLITS:
        raise ValueError(f"expected a Dark Zurich split in {DARKZURICH_SPLITS}, got {split!r}")
    if require_labels is None:
        require_labels = split == "val"
    samples = rgb_anon_samples(root, (split, time_of_day), require_labels, "Dark Zurich", LAYOUT)
    return unique_names(samples, "Dark Zurich")


def target(root: str | Path, *, conditions="all", table=None) -> tuple[list[Sample], list[Sample]]:
    return darkzurich_files(root, "train"), darkzurich_files(root, "val")
