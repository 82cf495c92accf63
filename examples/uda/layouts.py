r"""Readers of more dataset layouts: Cityscapes as the source, ACDC, Dark Zurich and a generic folder layout.

Every reader returns a list of :class:`data.Sample` (image, label or None, unique name, label format), the
records the pipeline's datasets take. Layouts (the datasets' own releases, nothing to convert):

* **Cityscapes as the source**: ``<root>/leftImg8bit/train/<city>/*_leftImg8bit.png`` with
  ``<root>/gtFine/train/<city>/*_gtFine_labelIds.png`` (Cityscapes *label ids*, mapped to train ids).
* **ACDC**: ``<root>/rgb_anon/<condition>/<split>/<sequence>/<stem>_rgb_anon.png`` with
  ``<root>/gt/<condition>/<split>/<sequence>/<stem>_gt_labelTrainIds.png``; conditions fog, night, rain, snow
  (one or several), splits train, val (labelled) and test (no public labels). The ``*_gt_labelTrainIds.png``
  files already hold the 19 Cityscapes *train ids* (255 ignore); they are read as such, never mapped through
  the label-id table a second time (which would turn e.g. traffic sign, train id 7, into road, label id 7).
* **Dark Zurich**: ``<root>/rgb_anon/train/night/<sequence>/<stem>_rgb_anon.png`` (the unlabelled target
  train set), ``<root>/rgb_anon/val/night/<sequence>/...`` with
  ``<root>/gt/val/night/<sequence>/<stem>_gt_labelTrainIds.png`` (train ids), ``rgb_anon/test/night/...``
  (no public labels). The train split's ``day`` and ``twilight`` folders are not read (``time_of_day``).
* **Folder** (your own data): ``<root>/[<split>/]images/**/<stem>.<png|jpg|...>`` with
  ``<root>/[<split>/]labels/**/<stem>.png`` (same relative path and stem), label PNGs of raw ids (8- or
  16-bit, single channel) mapped through a :class:`classes.ClassTable`.

Label formats. :class:`data.Sample` carries ``label_format``, a string for the original layouts
(``"cityscapes"``, ``"synthia"``). For the new ones it is a :class:`LabelFormat` (a class table and whether the
files hold raw ids or train ids); ``data.read_label`` (and the pre-flight check's ``data.decode_label_ids`` /
``data.check_label_ids``) hand those to :func:`read_label`, :func:`decode_raw_ids` and :func:`check_raw_ids`.
Bad files raise :class:`data.BadSampleError` naming them, so ``--on-bad-sample skip`` and the pre-flight check
work for every layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from . import data
from .classes import CITYSCAPES, ClassTable
from .data import Sample

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
ACDC_SPLITS = ("train", "val", "test")
DARKZURICH_SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ACDC_LAYOUT = ("<root>/rgb_anon/<condition>/<split>/<sequence>/*_rgb_anon.png and "
               "<root>/gt/<condition>/<split>/<sequence>/*_gt_labelTrainIds.png")
DARKZURICH_LAYOUT = ("<root>/rgb_anon/{train,val,test}/night/<sequence>/*_rgb_anon.png and "
                     "<root>/gt/val/night/<sequence>/*_gt_labelTrainIds.png")
FOLDER_LAYOUT = "<root>/[<split>/]images/<name>.<png|jpg|...> and <root>/[<split>/]labels/<name>.png"


@dataclass(frozen=True)
class LabelFormat:
    """How to turn a label file into train ids.

    ``table``: the classes; ``encoding``: ``"ids"`` (raw ids mapped through the table) or ``"trainids"`` (the
    file already holds the table's train ids 0..K-1 and 255 for ignore; any other value is an error naming the
    file); ``channel``: which channel of a multi-channel label PNG holds the ids (``None``: single-channel
    files only).
    """

    table: ClassTable
    encoding: str = "ids"
    channel: int | None = None

    def __post_init__(self) -> None:
        if self.encoding not in ("ids", "trainids"):
            raise ValueError(f"expected encoding 'ids' or 'trainids', got {self.encoding!r}")

    @cached_property
    def reading_table(self) -> ClassTable:
        """The table the file's values go through (the train-id table for ``encoding="trainids"``)."""
        return self.table if self.encoding == "ids" else self.table.train_id_table()


CITYSCAPES_IDS = LabelFormat(CITYSCAPES, "ids")
CITYSCAPES_TRAINIDS = LabelFormat(CITYSCAPES, "trainids")


def label_table(label_format: str | LabelFormat) -> ClassTable:
    """The class table (train classes) of a sample's label format."""
    if isinstance(label_format, LabelFormat):
        return label_format.table
    from .classes import SYNTHIA

    if label_format == "synthia":
        return SYNTHIA
    if label_format == "cityscapes":
        return CITYSCAPES
    raise ValueError(f"expected label_format in {data.LABEL_FORMATS} or a LabelFormat, got {label_format!r}")


def decode_raw_ids(path: str | Path, label_format: LabelFormat | None = None) -> np.ndarray:
    """The raw (H, W) integer ids of a label PNG at its full bit depth (8-bit, 16-bit, or the format's
    ``channel`` of a multi-channel PNG); :class:`data.BadSampleError` naming the file when it does not decode or
    has channels where a single-channel id map belongs."""
    channel = None if label_format is None else label_format.channel
    try:
        ids = data.read_png_channels(path)
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for broken files
        raise data.BadSampleError(f"label {str(path)!r} does not decode ({type(error).__name__}: {error})",
                                  path) from error
    if ids.ndim == 3:
        if channel is None:
            raise data.BadSampleError(
                f"label {str(path)!r}: expected a single-channel label map (8- or 16-bit ids), got {ids.shape[2]} "
                "channels (a colour rendering is not a label map)", path)
        ids = ids[..., channel]
    if ids.dtype == np.int32:  # Pillow's "I" mode (e.g. some 16-bit writers)
        ids = ids.astype(np.int64)
    return ids


def check_raw_ids(ids: np.ndarray, path: str | Path, label_format: LabelFormat) -> None:
    """:class:`data.BadSampleError` naming the file and the ids when ``ids`` hold a value the format's class table
    neither maps nor ignores (for ``encoding="trainids"``: anything but 0..K-1 and 255)."""
    train_ids(ids, path, label_format)


def train_ids(ids: np.ndarray, path: str | Path, label_format: LabelFormat) -> np.ndarray:
    try:
        return label_format.reading_table.map_ids(ids, source="the file")
    except ValueError as error:
        raise data.BadSampleError(f"label {str(path)!r}: {error}", path) from None


def read_label(path: str | Path, size: tuple[int, int], label_format: str | LabelFormat = "cityscapes",
               image_path: str | Path | None = None) -> np.ndarray:
    """Train ids (uint8, 255 ignore) of a label file at ``size`` = (W, H) (nearest resize when it differs).

    String formats are read by :func:`data.read_label`; a :class:`LabelFormat` maps through its table, with a
    :class:`data.BadSampleError` (a ``ValueError``) naming the file for a file that does not decode, has
    channels, holds an id the table does not know, or cannot be resized to its image (another aspect ratio).
    """
    if not isinstance(label_format, LabelFormat):
        return data.read_label(Path(path), size, label_format, image_path)
    ids = decode_raw_ids(path, label_format)
    train = train_ids(ids, path, label_format)
    label_size = (train.shape[1], train.shape[0])
    if label_size != tuple(size):
        data.check_label_size(label_size, size, path, image_path if image_path is not None else "?")
        train = np.asarray(Image.fromarray(train).resize(tuple(size), Image.NEAREST))
    return train


def read_sample_label(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """The train-id label map of ``sample`` at ``size`` = (W, H)."""
    return read_label(sample.label, size, sample.label_format, sample.image)


def _unique(samples: list[Sample], dataset: str) -> list[Sample]:
    seen: dict[str, Path] = {}
    for s in samples:
        if s.name in seen:
            raise ValueError(f"expected unique image names in the {dataset} layout, got {s.name!r} for "
                             f"{str(seen[s.name])!r} and {str(s.image)!r}")
        seen[s.name] = s.image
    return samples


def _root(root: str | Path, option: str, dataset: str, layout: str) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"expected {option} to be a directory in the {dataset} layout ({layout}), got {str(root)!r}")
    return root


def _choices(value: str | Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    values = (value,) if isinstance(value, str) else tuple(value)
    if "all" in values:
        values = tuple(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"expected {what} in {tuple(allowed)} (or 'all'), got {list(values)}")
    return tuple(dict.fromkeys(values))


# ------------------------------------------------------------------------------------------------ Cityscapes
def cityscapes_source_files(root: str | Path, split: str = "train") -> list[Sample]:
    """Cityscapes as the labelled source: ``split`` (train) with its gtFine label ids (required)."""
    return data.cityscapes_files(root, split, require_labels=True)


# ------------------------------------------------------------------------------------------------------ ACDC
def acdc_files(root: str | Path, split: str, conditions: str | Iterable[str] = ACDC_CONDITIONS, *,
               require_labels: bool | None = None) -> list[Sample]:
    """ACDC samples of ``split`` for one condition or several (``"all"`` = fog, night, rain, snow).

    Labels are the ``*_gt_labelTrainIds.png`` files (train ids, :data:`CITYSCAPES_TRAINIDS`). ``require_labels``
    (default: on for train and val, off for test): a missing label is an error; otherwise it is ``None``.
    Names are the file stems (``GOPR0475_frame_000041``); they must be unique across the conditions read.
    """
    root = _root(root, "--acdc-root", "ACDC", ACDC_LAYOUT)
    if split not in ACDC_SPLITS:
        raise ValueError(f"expected an ACDC split in {ACDC_SPLITS}, got {split!r}")
    conditions = _choices(conditions, ACDC_CONDITIONS, "ACDC conditions")
    if require_labels is None:
        require_labels = split != "test"
    samples = []
    for condition in conditions:
        samples += _rgb_anon_samples(root, (condition, split), require_labels, "ACDC", ACDC_LAYOUT)
    return _unique(samples, "ACDC")


def _rgb_anon_samples(root: Path, parts: tuple[str, ...], require_labels: bool, dataset: str, layout: str
                      ) -> list[Sample]:
    """The layout ACDC and Dark Zurich share: ``rgb_anon/<parts>/<sequence>/<stem>_rgb_anon.png`` with the label
    ``gt/<parts>/<sequence>/<stem>_gt_labelTrainIds.png`` (train ids; None where missing and not required)."""
    return data.sequence_samples(root.joinpath("rgb_anon", *parts), root.joinpath("gt", *parts), "_rgb_anon.png",
                                 "_gt_labelTrainIds.png", require_labels, f"{dataset} layout: {layout}",
                                 CITYSCAPES_TRAINIDS)


# ----------------------------------------------------------------------------------------------- Dark Zurich
def darkzurich_files(root: str | Path, split: str, *, time_of_day: str = "night",
                     require_labels: bool | None = None) -> list[Sample]:
    """Dark Zurich samples of ``split``: train (unlabelled target images), val (with train-id labels), test.

    ``require_labels`` defaults to on for val only: Dark Zurich has no train labels, and its test labels are
    not public.
    """
    root = _root(root, "--darkzurich-root", "Dark Zurich", DARKZURICH_LAYOUT)
    if split not in DARKZURICH_SPLITS:
        raise ValueError(f"expected a Dark Zurich split in {DARKZURICH_SPLITS}, got {split!r}")
    if require_labels is None:
        require_labels = split == "val"
    samples = _rgb_anon_samples(root, (split, time_of_day), require_labels, "Dark Zurich", DARKZURICH_LAYOUT)
    return _unique(samples, "Dark Zurich")


# ---------------------------------------------------------------------------------------------------- folder
def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; suffixes :data:`IMAGE_SUFFIXES` (any case)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_files(root: str | Path, table: ClassTable, split: str | None = None, *, require_labels: bool = True,
                 option: str = "--target-root") -> list[Sample]:
    """Your own data: ``<root>/[<split>/]images`` with label PNGs of the same relative names in ``labels/``.

    Labels hold raw ids mapped through ``table`` (``LabelFormat(table, "ids")``). ``split=None`` reads
    ``<root>/images`` directly; a split reads ``<root>/<split>/images``. Names are the paths relative to
    ``images/`` without suffix, ``/`` replaced by ``__`` (unique; used for pseudo-label files).
    """
    root = _root(root, option, "folder", FOLDER_LAYOUT)
    base = root if split is None else root / split
    image_dir, label_dir = base / "images", base / "labels"
    images = image_files(image_dir) if image_dir.is_dir() else []
    if not images:
        raise ValueError(f"expected images ({', '.join(IMAGE_SUFFIXES)}) in {str(image_dir)!r} (folder layout: "
                         f"{FOLDER_LAYOUT}), found none")
    fmt = LabelFormat(table, "ids")
    samples = []
    for image in images:
        rel = image.relative_to(image_dir).with_suffix("")
        label = label_dir / rel.with_suffix(".png")
        if not label.is_file():
            if require_labels:
                raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} (folder layout: "
                                 f"{FOLDER_LAYOUT})")
            label = None
        samples.append(Sample(image, label, "__".join(rel.parts), fmt))
    return _unique(samples, "folder")


# -------------------------------------------------------------------------------------------- source/target
SOURCES = ("gta5", "synthia", "cityscapes", "folder")
TARGETS = ("cityscapes", "acdc", "darkzurich", "folder")


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
    if source == "gta5":
        return data.gta5_files(root)
    if source == "synthia":
        return data.synthia_files(root)
    if source == "cityscapes":
        return cityscapes_source_files(root)
    if source == "folder":
        if table is None:
            raise ValueError("expected --source-class-table or --class-table with --source folder")
        base = Path(root)
        split = "train" if (base / "train" / "images").is_dir() and not (base / "images").is_dir() else None
        return folder_files(root, table, split, option="--source-root")
    raise ValueError(f"expected --source in {SOURCES}, got {source!r}")


def target_samples(target: str, root: str | Path, *, conditions: str | Iterable[str] = "all",
                   table: ClassTable | None = None) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)`` of ``target`` (one of :data:`TARGETS`): train images (labels optional), labelled val."""
    if target == "cityscapes":
        return (data.cityscapes_files(root, "train", require_labels=False), data.cityscapes_files(root, "val"))
    if target == "acdc":
        return (acdc_files(root, "train", conditions, require_labels=False), acdc_files(root, "val", conditions))
    if target == "darkzurich":
        return darkzurich_files(root, "train"), darkzurich_files(root, "val")
    if target == "folder":
        if table is None:
            raise ValueError("expected --class-table with --target folder (the labels' raw ids and classes)")
        return (folder_files(root, table, "train", require_labels=False),
                folder_files(root, table, "val", option="--target-root"))
    raise ValueError(f"expected --target in {TARGETS}, got {target!r}")


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
    from .data import SYNTHIA_CLASSES_13, SYNTHIA_CLASSES_16

    subsets = {"16": SYNTHIA_CLASSES_16, "13": SYNTHIA_CLASSES_13} if source == "synthia" else None
    return Domains(src, train, val, t_table, subsets)
