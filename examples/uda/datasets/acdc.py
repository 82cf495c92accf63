"""ACDC (Sakaridis et al. 2021): ``<root>/rgb_anon/<condition>/<split>/<sequence>/<stem>_rgb_anon.png`` with
``<root>/gt/<condition>/<split>/<sequence>/<stem>_gt_labelTrainIds.png``; conditions fog, night, rain, snow,
splits train, val (labelled) and test (no public labels). The labels already hold the 19 Cityscapes train ids
(:data:`labels.CITYSCAPES_TRAINIDS`): read as such, never mapped through the label-id table a second time (which
would turn e.g. traffic sign, train id 7, into road, label id 7). A target dataset."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .base import Sample, check_root, choices, rgb_anon_samples, unique_names

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
ACDC_SPLITS = ("train", "val", "test")
LAYOUT = ("<root>/rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
          "<root>/gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png")


def acdc_files(root: str | Path, split: str, conditions: str | Iterable[str] = ACDC_CONDITIONS, *,
               require_labels: bool | None = None) -> list[Sample]:
    """ACDC samples of ``split`` for one condition or several (``"all"`` = fog, night, rain, snow).

    ``require_labels`` (default: on for train and val, off for test): a missing label is an error; otherwise it
    is ``None``. Names are the file stems (``GOPR0475_frame_000041``); unique across the conditions read.
    """
    root = check_root(root, "--acdc-root", "ACDC", LAYOUT)
    if split not in ACDC_SPLITS:
        raise ValueError(f"expected an ACDC split in {ACDC_SPLITS}, got {split!r}")
    conditions = choices(conditions, ACDC_CONDITIONS, "ACDC conditions")
    if require_labels is None:
        require_labels = split != "test"
    samples = []
    for condition in conditions:
        samples += rgb_anon_samples(root, (condition, split), require_labels, "ACDC", LAYOUT)
    return unique_names(samples, "ACDC")


def target(root: str | Path, *, conditions="all", table=None) -> tuple[list[Sample], list[Sample]]:
    return acdc_files(root, "train", conditions, require_labels=False), acdc_files(root, "val", conditions)
