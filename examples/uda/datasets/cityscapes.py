"""Cityscapes (Cordts et al. 2016): ``<root>/leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
``<root>/gtFine/<split>/<city>/*_gtFine_labelIds.png``, Cityscapes label ids (label format ``"cityscapes"``).
The usual target (train images unlabelled, val labelled), or a labelled source (train)."""

from __future__ import annotations

from pathlib import Path

from .base import Sample, check_root, sequence_samples

LAYOUT = ("<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
          "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")


def cityscapes_files(root: str | Path, split: str, *, require_labels: bool = True) -> list[Sample]:
    """List Cityscapes samples of ``split``; ``ValueError`` naming the path and the layout if there are none."""
    root = check_root(root, "--cityscapes-root", "Cityscapes", LAYOUT)
    return sequence_samples(root / "leftImg8bit" / split, root / "gtFine" / split, "_leftImg8bit.png",
                            "_gtFine_labelIds.png", require_labels, f"Cityscapes layout: {LAYOUT}")


def source(root: str | Path, *, table=None) -> list[Sample]:
    return cityscapes_files(root, "train")


def target(root: str | Path, *, conditions="all", table=None) -> tuple[list[Sample], list[Sample]]:
    return cityscapes_files(root, "train", require_labels=False), cityscapes_files(root, "val")
