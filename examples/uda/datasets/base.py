r"""What every dataset lister shares: :class:`Sample` and the helpers that list files in the common layouts.

A lister returns a list of :class:`Sample` (image, label or None, unique name, label format) and raises a
``ValueError`` naming the path and the layout when the files are not there: a missing root
(:func:`check_root`), no images, or a missing label where one is required.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..labels import CITYSCAPES_TRAINIDS, LabelFormat

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class Sample:
    """One image file, its label file (or None), a unique name (used for pseudo-label files) and the label
    format: a :class:`labels.LabelFormat` or a built-in one's name (``"cityscapes"``: 8-bit Cityscapes label
    ids, GTA5 and Cityscapes; ``"synthia"``: SYNTHIA's 16-bit labels)."""

    image: Path
    label: Path | None
    name: str
    label_format: str | LabelFormat = "cityscapes"


def check_root(root: str | Path, option: str, dataset: str, layout: str) -> Path:
    """``root`` as a Path; ``ValueError`` naming ``option`` and the layout unless it is a directory."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"expected {option} to be a directory in the {dataset} layout ({layout}), got {str(root)!r}")
    return root


def paired_files(root: str | Path, option: str, dataset: str, layout: str, image_dir: str, label_dir: str,
                 label_format: str | LabelFormat) -> list[Sample]:
    """``<root>/<image_dir>/*.png`` with labels of the same names in ``<root>/<label_dir>`` (GTA5, SYNTHIA);
    ``ValueError`` naming the path and the layout when the root, the images or a label is missing."""
    root = check_root(root, option, dataset, layout)
    images = sorted((root / image_dir).glob("*.png"))
    if not images:
        raise ValueError(f"expected PNG images in {str(root / image_dir)!r} ({dataset} layout: {layout}), found none")
    samples = []
    for image in images:
        label = root / label_dir / image.name
        if not label.is_file():
            raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} ({dataset} layout: {layout})")
        samples.append(Sample(image, label, image.stem, label_format))
    return samples


def sequence_samples(image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str, require_labels: bool,
                     layout: str, label_format: str | LabelFormat = "cityscapes") -> list[Sample]:
    """The layout Cityscapes, ACDC and Dark Zurich share: ``<image_dir>/<sequence>/<stem><image_suffix>`` with the
    label ``<label_dir>/<sequence>/<stem><label_suffix>`` (None where missing and not required). ``layout`` is
    named in every error (``"Cityscapes layout: ..."``)."""
    images = sorted(image_dir.glob(f"*/*{image_suffix}"))
    if not images:
        raise ValueError(f"expected images in {str(image_dir)!r} ({layout}), found none")
    samples = []
    for image in images:
        stem = image.name[: -len(image_suffix)]
        label = label_dir / image.parent.name / f"{stem}{label_suffix}"
        if not label.is_file():
            if require_labels:
                raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} ({layout})")
            label = None
        samples.append(Sample(image, label, stem, label_format))
    return samples


def rgb_anon_samples(root: Path, parts: tuple[str, ...], require_labels: bool, dataset: str, layout: str
                     ) -> list[Sample]:
    """The layout ACDC and Dark Zurich share: ``rgb_anon/<parts>/<sequence>/<stem>_rgb_anon.png`` with the label
    ``gt/<parts>/<sequence>/<stem>_gt_labelTrainIds.png`` (train ids; None where missing and not required)."""
    return sequence_samples(root.joinpath("rgb_anon", *parts), root.joinpath("gt", *parts), "_rgb_anon.png",
                            "_gt_labelTrainIds.png", require_labels, f"{dataset} layout: {layout}",
                            CITYSCAPES_TRAINIDS)


def unique_names(samples: list[Sample], dataset: str) -> list[Sample]:
    """``samples``; ``ValueError`` naming both files when two share a name (the pseudo-label files need unique
    names)."""
    seen: dict[str, Path] = {}
    for s in samples:
        if s.name in seen:
            raise ValueError(f"expected unique image names in the {dataset} layout, got {s.name!r} for "
                             f"{str(seen[s.name])!r} and {str(s.image)!r}")
        seen[s.name] = s.image
    return samples


def choices(value: str | Iterable[str], allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """One value or several of ``allowed`` (``"all"``: every one), in order, without repeats."""
    values = (value,) if isinstance(value, str) else tuple(value)
    if "all" in values:
        values = tuple(allowed)
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(f"expected {what} in {tuple(allowed)} (or 'all'), got {list(values)}")
    return tuple(dict.fromkeys(values))


def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursively), sorted; suffixes :data:`IMAGE_SUFFIXES` (any case)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
