"""SYNTHIA-RAND-CITYSCAPES (Ros et al. 2016): ``<root>/RGB/*.png`` with ``<root>/GT/LABELS/*.png`` of the same
names, 16-bit PNGs with the class id in channel 1 (label format ``"synthia"``). A source dataset; the benchmark
reports the mIoU over its 16 and 13 classes (:data:`SUBSETS`)."""

from __future__ import annotations

from pathlib import Path

from ..classes import SYNTHIA_SUBSETS
from .base import Sample, paired_files

LAYOUT = "<root>/RGB/*.png with <root>/GT/LABELS/*.png of the same names (16-bit, class id in channel 1)"
SUBSETS = SYNTHIA_SUBSETS


def synthia_files(root: str | Path) -> list[Sample]:
    """List SYNTHIA-RAND-CITYSCAPES samples; ``ValueError`` naming the path and the layout if there are none."""
    return paired_files(root, "--synthia-root", "SYNTHIA-RAND-CITYSCAPES", LAYOUT, "RGB", "GT/LABELS", "synthia")


def source(root: str | Path, *, table=None) -> list[Sample]:
    return synthia_files(root)
