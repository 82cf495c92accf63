"""Your own data: ``<root>/[<split>/]images/**/<stem>.<png|jpg|...>`` with label PNGs of the same relative names
in ``<root>/[<split>/]labels/``, raw ids (8- or 16-bit, single channel) mapped through a class table
(``LabelFormat(table)``, docs/datasets.md). A source (``<root>/images`` or ``<root>/train/images``) or a target
(``<root>/train`` unlabelled, ``<root>/val`` labelled)."""

from __future__ import annotations

from pathlib import Path

from ..classes import ClassTable
from ..labels import LabelFormat
from .base import IMAGE_SUFFIXES, Sample, check_root, image_files, unique_names

LAYOUT = "<root>/[<split>/]images/<name>.<png|jpg|...> and <root>/[<split>/]labels/<name>.png"


def folder_files(root: str | Path, table: ClassTable, split: str | None = None, *, require_labels: bool = True,
                 option: str = "--target-root") -> list[Sample]:
    """``<root>/[<split>/]images`` (``split=None``: ``<root>/images``) with the labels in ``labels/``. Names are
    the paths relative to ``images/`` without suffix, ``/`` replaced by ``__`` (unique; pseudo-label files)."""
    base = check_root(root, option, "folder", LAYOUT) / (split or "")
    image_dir, label_dir = base / "images", base / "labels"
    images = image_files(image_dir) if image_dir.is_dir() else []
    if not images:
        raise ValueError(f"expected images ({', '.join(IMAGE_SUFFIXES)}) in {str(image_dir)!r} (folder layout: "
                         f"{LAYOUT}), found none")
    fmt = LabelFormat(table, "ids")
    samples = []
    for image in images:
        rel = image.relative_to(image_dir).with_suffix("")
        label = label_dir / rel.with_suffix(".png")
        if not label.is_file():
            if require_labels:
                raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} (folder layout: {LAYOUT})")
            label = None
        samples.append(Sample(image, label, "__".join(rel.parts), fmt))
    return unique_names(samples, "folder")


def source(root: str | Path, *, table: ClassTable | None = None) -> list[Sample]:
    if table is None:
        raise ValueError("expected --source-class-table or --class-table with --source folder")
    base = Path(root)
    split = "train" if (base / "train" / "images").is_dir() and not (base / "images").is_dir() else None
    return folder_files(root, table, split, option="--source-root")


def target(root: str | Path, *, conditions="all", table: ClassTable | None = None
           ) -> tuple[list[Sample], list[Sample]]:
    if table is None:
        raise ValueError("expected --class-table with --target folder (the labels' raw ids and classes)")
    return folder_files(root, table, "train", require_labels=False), folder_files(root, table, "val")
