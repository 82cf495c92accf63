"""GTA5 (Richter et al. 2016): ``<root>/images/*.png`` with ``<root>/labels/*.png`` of the same names, 8-bit
Cityscapes label ids (label format ``"cityscapes"``). A source dataset."""

from __future__ import annotations

from pathlib import Path

from .base import Sample, paired_files

LAYOUT = "<root>/images/*.png with <root>/labels/*.png of the same names"


def gta5_files(root: str | Path) -> list[Sample]:
    """List GTA5 samples under ``root``; ``ValueError`` naming the path and the layout if there are none."""
    return paired_files(root, "--gta5-root", "GTA5", LAYOUT, "images", "labels", "cityscapes")


def source(root: str | Path, *, table=None) -> list[Sample]:
    return gta5_files(root)
