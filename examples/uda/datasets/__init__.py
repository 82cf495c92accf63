r"""Dataset listers: one small file per dataset, each a lister of (image, label) :class:`Sample` records and the
label format its files hold, and the registry that names them for ``--source`` and ``--target``.

Every dataset is read in its own released layout (docs/datasets.md). A dataset module defines ``source(root, *,
table=None) -> samples`` when it can be the labelled source, ``target(root, *, conditions="all", table=None) ->
(train, val)`` when it can be the target (train images, labels optional; the labelled val split that is
reported), and optionally ``SUBSETS``, the class subsets its benchmark reports (SYNTHIA: 16 and 13 classes).
Adding a dataset is one file in this folder and one line in :data:`SOURCE_DATASETS` or
:data:`TARGET_DATASETS`. Decoding, checks, transforms and class tables are shared (:mod:`uda.labels`,
:mod:`uda.loading`, :mod:`uda.classes`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..classes import ClassTable
from ..labels import label_table
from . import acdc, cityscapes, darkzurich, folder, gta5, synthia
from .acdc import ACDC_CONDITIONS, acdc_files
from .base import IMAGE_SUFFIXES, Sample, image_files, paired_files, sequence_samples
from .cityscapes import cityscapes_files
from .darkzurich import darkzurich_files
from .folder import folder_files
from .gta5 import gta5_files
from .synthia import synthia_files

__all__ = ["ACDC_CONDITIONS", "IMAGE_SUFFIXES", "SOURCES", "TARGETS", "Domains", "Sample", "acdc_files",
           "cityscapes_files", "darkzurich_files", "folder_files", "gta5_files", "image_files", "paired_files",
           "resolve_domains", "sequence_samples", "source_samples", "synthia_files", "target_samples"]

# the registry: option value -> dataset module
SOURCE_DATASETS = {"gta5": gta5, "synthia": synthia, "cityscapes": cityscapes, "folder": folder}
TARGET_DATASETS = {"cityscapes": cityscapes, "acdc": acdc, "darkzurich": darkzurich, "folder": folder}
SOURCES = tuple(SOURCE_DATASETS)
TARGETS = tuple(TARGET_DATASETS)


@dataclass(frozen=True)
class Domains:
    """The samples of a run and its classes.

    ``source``: labelled source images; ``target_train``: the target's training images (labels, when the layout
    has them, are read only for the opt-in diagnostics); ``target_val``: the labelled split that is reported;
    ``table``: the run's K classes (names, colours; the target's table, checked against the source's);
    ``subsets``: the evaluation protocol's class subsets (SYNTHIA: 16 and 13 classes) or ``None``.
    """

    source: list[Sample]
    target_train: list[Sample]
    target_val: list[Sample]
    table: ClassTable
    subsets: dict[str, tuple[int, ...]] | None = None


def source_samples(source: str, root: str | Path, *, table: ClassTable | None = None) -> list[Sample]:
    """The labelled source images of ``source`` (one of :data:`SOURCES`) under ``root``."""
    if source not in SOURCE_DATASETS:
        raise ValueError(f"expected --source in {SOURCES}, got {source!r}")
    return SOURCE_DATASETS[source].source(root, table=table)


def target_samples(target: str, root: str | Path, *, conditions: str | Iterable[str] = "all",
                   table: ClassTable | None = None) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)`` of ``target`` (one of :data:`TARGETS`): train images (labels optional), labelled val."""
    if target not in TARGET_DATASETS:
        raise ValueError(f"expected --target in {TARGETS}, got {target!r}")
    return TARGET_DATASETS[target].target(root, conditions=conditions, table=table)


def resolve_domains(source: str, source_root: str | Path, target: str, target_root: str | Path, *,
                    conditions: str | Iterable[str] = "all", class_table: ClassTable | None = None,
                    source_class_table: ClassTable | None = None) -> Domains:
    """Read both domains and check that their classes agree (same K and names; ``ValueError`` otherwise).

    ``class_table``: the target's classes for ``--target folder`` (and the source's for ``--source folder``
    unless ``source_class_table`` is given); the built-in layouts use the 19 Cityscapes classes.
    """
    if source == target and source != "folder":
        raise ValueError(f"expected different --source and --target datasets, got {source!r} for both")
    src_table = source_class_table or class_table
    src = source_samples(source, source_root, table=src_table if source == "folder" else None)
    train, val = target_samples(target, target_root, conditions=conditions,
                                table=class_table if target == "folder" else None)
    s_table, t_table = label_table(src[0].label_format), label_table(val[0].label_format)
    s_table.check_compatible(t_table, what=f"--source {source} and --target {target}")
    return Domains(src, train, val, t_table, getattr(SOURCE_DATASETS[source], "SUBSETS", None))
