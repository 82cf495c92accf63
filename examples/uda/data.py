r"""GTA5, SYNTHIA and Cityscapes readers, transforms and a resumable, shardable batch stream.

On-disk layouts (the datasets' own, see the protocl method spec §4):

* GTA5: ``<root>/images/*.png`` and ``<root>/labels/*.png`` (same file names; Cityscapes label ids).
* SYNTHIA-RAND-CITYSCAPES: ``<root>/RGB/*.png`` and ``<root>/GT/LABELS/*.png`` (same file names). The label
  PNGs have 16 bits per channel; the first channel holds the SYNTHIA class id (the second an instance id).
  Pillow reduces 16-bit RGB PNGs to their high bytes, which would turn every class id into 0, so
  :func:`read_png_channels` decodes them at full depth.
* Cityscapes: ``<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png``.

Label ids are mapped to the 19 Cityscapes train ids (everything else -> 255); SYNTHIA has 16 of the 19 classes
(no terrain, truck, train), see :data:`SYNTHIA_ID_TO_TRAIN_ID`. Training samples go through: resize of
the short side, random scale, random crop (padding with ignore when needed), horizontal flip. Every random
choice of a sample comes from a seed handed out by :class:`BatchStream` with its index, so a batch depends
only on (seed, stream, epoch, position): the same whatever the number of workers, and reproducible after a
resume. Images stay uint8 RGB; the model subtracts the mean (see :mod:`model`).

Bad files. Every read names its file when it fails (:class:`BadSampleError`, a ``ValueError``): an image that
does not decode (truncated, not an image), a label that does not decode, is in the wrong mode for its format (an
RGB colour rendering where an 8-bit id map belongs; SYNTHIA labels must be 16-bit RGB), holds values outside its
format's id range (Cityscapes/GTA5: 8-bit ids, e.g. not an instance-id file; unlisted ids are ignored), or whose size differs from its image by more than
a rescale (allowed: the same aspect ratio within :data:`ASPECT_TOLERANCE`, e.g. the few GTA5 labels whose size
differs from their image; they are resized nearest). The training sets take ``on_bad_sample``: ``"error"``
(default) raises; ``"skip"`` replaces the sample deterministically (see :class:`TrainSet`) and reports it in the
batch. :mod:`preflight` runs the same checks over whole splits before training.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from protocl import IGNORE_INDEX

IGNORE = IGNORE_INDEX  # an alias: tests/test_shifts.py still imports data.IGNORE
NUM_CLASSES = 19
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# Cityscapes label id -> train id (spec §4); everything else is ignored.
ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def lookup_table(mapping: dict[int, int], size: int) -> np.ndarray:
    """A (size,) uint8 lookup table from label ids to train ids (255 for ids not in ``mapping``)."""
    lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in mapping.items():
        lut[label_id] = train_id
    return lut


def id_to_train_id_lut() -> np.ndarray:
    """A (256,) uint8 lookup table from Cityscapes label ids to train ids (255 elsewhere)."""
    return lookup_table(ID_TO_TRAIN_ID, 256)


_LUT = id_to_train_id_lut()

# SYNTHIA-RAND-CITYSCAPES class id (first channel of GT/LABELS/*.png, the dataset's README) -> Cityscapes train
# id. Ids 0 void, 13 parking-slot, 14 road-work and 22 lane-marking are ignored; 16 terrain, 18 truck and
# 20 train exist in the id table but are never used in the images, so they are ignored as well.
SYNTHIA_ID_TO_TRAIN_ID = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12, 8: 13,
                          19: 15, 12: 17, 11: 18}
# the benchmark's classes (train ids): the 16 that SYNTHIA and Cityscapes share, and the usual 13 (without
# wall, fence and pole)
SYNTHIA_CLASSES_16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
SYNTHIA_CLASSES_13 = tuple(k for k in SYNTHIA_CLASSES_16 if k not in (3, 4, 5))


def synthia_id_to_train_id_lut() -> np.ndarray:
    """A (65536,) uint8 lookup table from SYNTHIA class ids (16-bit) to Cityscapes train ids (255 elsewhere)."""
    return lookup_table(SYNTHIA_ID_TO_TRAIN_ID, 2**16)


_SYNTHIA_LUT = synthia_id_to_train_id_lut()
LABEL_FORMATS = ("cityscapes", "synthia")
ON_BAD_SAMPLE = ("error", "skip")
# the largest id a label file may hold. Cityscapes label ids (GTA5 uses them too) are 8-bit: every value 0-255
# is mappable (the listed ids to train ids, everything else to ignore, spec §4), a larger one (a 16/32-bit file
# such as *_gtFine_instanceIds.png, id * 1000 + instance) is not. SYNTHIA class ids are 16-bit (channel 1; the
# README's 0-22 map to train ids, any other value to ignore).
MAX_LABEL_ID = {"cityscapes": 255, "synthia": 2**16 - 1}
# a label may differ in size from its image when it is a rescale of it: same aspect ratio within 5 %
ASPECT_TOLERANCE = 0.05
LABEL_MODES = {"cityscapes": ("L", "P", "I", "I;16"), "synthia": ("RGB;16",)}


class BadSampleError(ValueError):
    """A file of a dataset that cannot be used; the message names the path and the reason, :attr:`path` holds
    the path (None when the error was re-raised from a DataLoader worker, whose message still names it)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def decode_image(path: str | Path) -> Image.Image:
    """The RGB image at ``path``, fully decoded; :class:`BadSampleError` naming the path when it does not decode."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes every pixel (a truncated file fails here)
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for broken files
        raise BadSampleError(f"image {str(path)!r} does not decode ({_reason(error)})", path) from error


def decode_label_ids(path: str | Path, label_format: str = "cityscapes") -> np.ndarray:
    """The raw ids of a label file, ``(H, W)``, unmapped: Cityscapes label ids (8-bit L/P, or 16/32-bit I) or
    SYNTHIA class ids (channel 1 of a 16-bit RGB PNG). :class:`BadSampleError` naming the path when the file
    does not decode or is in another mode (e.g. an RGB colour rendering where an id map belongs). A
    :class:`layouts.LabelFormat` reads single-channel 8/16-bit ids (:func:`layouts.decode_raw_ids`)."""
    if not isinstance(label_format, str):
        from .layouts import decode_raw_ids

        return decode_raw_ids(path, label_format)
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"expected label_format in {LABEL_FORMATS}, got {label_format!r}")
    try:
        if label_format == "synthia":
            ids = read_png_channels(path)
            if ids.ndim != 3 or ids.dtype != np.uint16:
                with Image.open(path) as image:
                    mode = image.mode
                raise BadSampleError(
                    f"label {str(path)!r}: expected a 16-bit RGB PNG (SYNTHIA GT/LABELS, class id in channel 1), "
                    f"got {ids.dtype.itemsize * 8}-bit mode {mode}", path)
            return ids[..., 0]
        with Image.open(path) as label:
            mode = label.mode
            if mode not in LABEL_MODES["cityscapes"]:
                what = " (a colour rendering?)" if mode in ("RGB", "RGBA") else ""
                raise BadSampleError(
                    f"label {str(path)!r}: expected a single-channel id map (mode L, P or I: Cityscapes label "
                    f"ids, as GTA5 labels/*.png and *_gtFine_labelIds.png hold them), got mode {mode}{what}", path)
            return np.asarray(label)
    except BadSampleError:
        raise
    except MemoryError:
        raise
    except Exception as error:
        raise BadSampleError(f"label {str(path)!r} does not decode ({_reason(error)})", path) from error


def check_label_ids(ids: np.ndarray, path: str | Path, label_format: str = "cityscapes") -> None:
    """:class:`BadSampleError` naming the path and the values when ``ids`` hold values outside the format's id
    range (0 to :data:`MAX_LABEL_ID`; within it every value is mappable, unlisted ids become ignore). A
    :class:`layouts.LabelFormat`: ids its class table does not map or ignore (:func:`layouts.check_raw_ids`)."""
    if not isinstance(label_format, str):
        from .layouts import check_raw_ids

        return check_raw_ids(ids, path, label_format)
    top = MAX_LABEL_ID[label_format]
    if ids.dtype == np.uint8 or (ids.dtype == np.uint16 and top >= 2**16 - 1) or ids.size == 0:
        return
    if int(ids.min()) >= 0 and int(ids.max()) <= top:
        return
    bad = (ids < 0) | (ids > top)
    values = np.unique(ids[bad])
    shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
    allowed = ("8-bit Cityscapes label ids 0-255 (not an instance-id file, id * 1000 + instance)"
               if label_format == "cityscapes" else f"SYNTHIA class ids 0-{top}")
    raise BadSampleError(f"label {str(path)!r}: expected {allowed}, got {shown} on {int(bad.sum())} pixels", path)


def check_label_size(label_size: tuple[int, int], image_size: tuple[int, int], label_path: str | Path,
                     image_path: str | Path) -> None:
    """:class:`BadSampleError` unless a label of ``label_size`` = (W, H) can be resized (nearest) to its image's
    ``image_size``: equal, or the same aspect ratio within :data:`ASPECT_TOLERANCE`."""
    if tuple(label_size) == tuple(image_size):
        return
    (lw, lh), (iw, ih) = label_size, image_size
    if min(lw, lh, iw, ih) > 0 and abs((lw / lh) / (iw / ih) - 1) <= ASPECT_TOLERANCE:
        return
    raise BadSampleError(
        f"label {str(label_path)!r}: size {lw}x{lh} does not match its image {str(image_path)!r} of {iw}x{ih} "
        f"(allowed: equal sizes, or a rescale of the same aspect ratio within {ASPECT_TOLERANCE:.0%}, resized "
        "nearest)", label_path)


@dataclass(frozen=True)
class Sample:
    """One image file, its label file (or None), a unique name (used for pseudo-label files) and the label
    format: ``"cityscapes"`` (8-bit Cityscapes label ids: GTA5 and Cityscapes) or ``"synthia"``."""

    image: Path
    label: Path | None
    name: str
    label_format: str = "cityscapes"


def _paired_files(root: str | Path, option: str, dataset: str, layout: str, image_dir: str, label_dir: str,
                  label_format: str) -> list[Sample]:
    """``<root>/<image_dir>/*.png`` with labels of the same names in ``<root>/<label_dir>``; ``ValueError`` naming
    the path and the layout when the root, the images or a label is missing."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"expected {option} to be a directory in the {dataset} layout ({layout}), got {str(root)!r}")
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


def gta5_files(root: str | Path) -> list[Sample]:
    """List GTA5 samples under ``root``; ``ValueError`` naming the path and the layout if there are none."""
    return _paired_files(root, "--gta5-root", "GTA5", "<root>/images/*.png with <root>/labels/*.png of the same names",
                         "images", "labels", "cityscapes")


def synthia_files(root: str | Path) -> list[Sample]:
    """List SYNTHIA-RAND-CITYSCAPES samples; ``ValueError`` naming the path and the layout if there are none."""
    return _paired_files(root, "--synthia-root", "SYNTHIA-RAND-CITYSCAPES",
                         "<root>/RGB/*.png with <root>/GT/LABELS/*.png of the same names (16-bit, class id in "
                         "channel 1)", "RGB", "GT/LABELS", "synthia")


def cityscapes_files(root: str | Path, split: str, *, require_labels: bool = True) -> list[Sample]:
    """List Cityscapes samples of ``split``; ``ValueError`` naming the path and the layout if there are none."""
    root = Path(root)
    layout = ("<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
              "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")
    if not root.is_dir():
        raise ValueError(
            f"expected --cityscapes-root to be a directory in the Cityscapes layout ({layout}), got {str(root)!r}"
        )
    return sequence_samples(root / "leftImg8bit" / split, root / "gtFine" / split, "_leftImg8bit.png",
                            "_gtFine_labelIds.png", require_labels, f"Cityscapes layout: {layout}")


def sequence_samples(image_dir: Path, label_dir: Path, image_suffix: str, label_suffix: str, require_labels: bool,
                     layout: str, label_format: str = "cityscapes") -> list[Sample]:
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


def read_image(path: Path) -> Image.Image:
    """:func:`decode_image` (kept under its old name)."""
    return decode_image(path)


def read_png_channels(path: str | Path) -> np.ndarray:
    """The pixel values of a PNG at their full bit depth: ``(H, W)`` or ``(H, W, C)``, uint8 or uint16.

    Pillow decodes 16-bit RGB(A) PNGs to 8 bits by keeping the high byte of each sample. Here such a file is
    decoded twice by Pillow's own decoder, once keeping the high and once the low byte of every sample
    (big-endian and little-endian raw modes), and the two are recombined: exact 16-bit values at C speed.
    """
    with Image.open(path) as image:
        tile = image.tile[0] if len(image.tile) == 1 else None
        rawmode = tile[3] if tile is not None and isinstance(tile[3], str) else None
        if image.mode not in ("RGB", "RGBA") or rawmode not in ("RGB;16B", "RGBA;16B"):
            return np.asarray(image)
    planes = []
    for raw in (rawmode, rawmode.replace(";16B", ";16L")):  # high bytes, then low bytes
        with Image.open(path) as image:
            tile = image.tile[0]
            image.tile = [tile._replace(args=raw) if hasattr(tile, "_replace") else (*tile[:3], raw)]
            planes.append(np.asarray(image).astype(np.uint16))
    return (planes[0] << 8) | planes[1]


def read_label(path: Path, size: tuple[int, int], label_format: str = "cityscapes",
               image_path: str | Path | None = None) -> np.ndarray:
    """Read a label PNG, map it to train ids (uint8), nearest-resize to ``size`` = (W, H) when it differs.

    ``label_format``: ``"cityscapes"`` (8-bit Cityscapes label ids; GTA5 uses them too), ``"synthia"``
    (16-bit SYNTHIA class ids in the first channel) or a :class:`layouts.LabelFormat` (a class table's raw ids,
    or files that already hold train ids such as ACDC's ``*_gt_labelTrainIds.png``: :func:`layouts.read_label`).
    :class:`BadSampleError` naming the file when it does not decode, is in the wrong mode, holds ids outside the
    format's (a class table's: ids it does not map) or cannot be resized to ``size`` (another aspect ratio;
    ``image_path`` is named in that message).
    """
    if not isinstance(label_format, str):
        from .layouts import read_label as read_table_label

        return read_table_label(path, size, label_format, image_path)
    ids = decode_label_ids(path, label_format)
    check_label_ids(ids, path, label_format)
    lut = _SYNTHIA_LUT if label_format == "synthia" else _LUT
    label_size = (ids.shape[1], ids.shape[0])
    if label_size != tuple(size):  # a few GTA5 labels differ in size from their image
        check_label_size(label_size, size, path, image_path if image_path is not None else "?")
        label = Image.fromarray(lut[ids.astype(np.int64)]).resize(size, Image.NEAREST)
        return np.asarray(label)
    return lut[ids.astype(np.int64) if ids.dtype != np.uint8 else ids]


def read_sample_label(sample: Sample, size: tuple[int, int]) -> np.ndarray:
    """The train-id label map of ``sample`` at ``size`` = (W, H)."""
    return read_label(sample.label, size, sample.label_format, sample.image)


def short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(W, H) with the short side resized to ``short`` (aspect kept)."""
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_pair(image: Image.Image, labels: list[Image.Image], size: tuple[int, int]):
    return image.resize(size, Image.BILINEAR), [lab.resize(size, Image.NEAREST) for lab in labels]


def skip_record(error: BadSampleError) -> str:
    """One line of a ``skipped_files`` entry: ``"<path>\t<message>"``."""
    return f"{error.path or '?'}\t{error}"


def skip_records(batch: dict) -> list[tuple[str, str]]:
    """The ``(path, message)`` of every bad file a batch (or an item) passed over (``on_bad_sample="skip"``);
    reads the CPU tensor ``skipped`` only, never a device value."""
    if "skipped" not in batch or not int(torch.as_tensor(batch["skipped"]).sum()):
        return []
    entries = batch["skipped_files"]
    entries = [entries] if isinstance(entries, str) else entries
    records = []
    for entry in entries:
        for line in entry.splitlines():
            if line:
                path, _, message = line.partition("\t")
                records.append((path, message))
    return records


class SkipCounter:
    """An iterable over ``loader`` that keeps the :func:`skip_records` of the batches it yields (in
    :attr:`pending`, emptied by :meth:`take`), for loaders that another function iterates (the evaluation)."""

    def __init__(self, loader) -> None:
        self.loader, self.pending = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.pending += skip_records(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def take(self) -> list[tuple[str, str]]:
        pending, self.pending = self.pending, []
        return pending


def _check_on_bad_sample(value: str) -> str:
    if value not in ON_BAD_SAMPLE:
        raise ValueError(f"expected on_bad_sample in {ON_BAD_SAMPLE}, got {value!r}")
    return value


class TrainSet(Dataset):
    r"""Training crops: ``dataset[(index, seed)]`` -> dict of ``image`` uint8 (3, c, c), ``index`` and

    - ``label`` uint8 (c, c), the ground truth, when ``labels=True`` (for the target set it is read only for
      the opt-in ``--diagnostics``; without them the target ground truth is never opened);
    - ``static`` uint8 (c, c) read from ``<pseudo_dir>/<name>.png`` when ``pseudo_dir`` is set;
    - with ``on_bad_sample="skip"`` only: ``skipped`` (int64 scalar, how many bad samples were passed over to
      produce this one, normally 0) and ``skipped_files`` (str, one ``"<path>\t<message>"`` line per bad file
      passed over, empty when none; :func:`skip_records` parses them). Collated, they are a tensor and a list of
      str per batch.

    Label maps stay uint8 (train ids and 255 fit a byte) so that the host-to-device copy moves an eighth of the
    bytes of int64; the trainer widens them to int64 on the device. Static pseudo labels are stored at the
    short-side-resized resolution (see :func:`pseudo_label_size`).

    A bad file (see the module's docstring) raises :class:`BadSampleError` naming it with
    ``on_bad_sample="error"`` (default). With ``"skip"`` the sample is replaced by the next index of the dataset
    (wrapping around) under the same augmentation seed, so a batch is still a pure function of its place in the
    stream and a resume stays exact; if every sample is bad the error is raised.
    """

    def __init__(self, samples: Sequence[Sample], *, resize: int, crop: int, scales: Sequence[float] = (1.0,),
                 flip: bool = True, pseudo_dir: str | Path | None = None, labels: bool = True,
                 on_bad_sample: str = "error") -> None:
        self.samples = list(samples)
        self.resize, self.crop, self.scales, self.flip = resize, crop, tuple(scales), flip
        self.pseudo_dir = None if pseudo_dir is None else Path(pseudo_dir)
        self.labels = labels
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        if self.on_bad_sample == "error":
            return self._load(index, seed)
        skipped = []
        for attempt in range(len(self.samples)):
            try:
                out = self._load((index + attempt) % len(self.samples), seed)
            except BadSampleError as error:
                skipped.append(skip_record(error))
                continue
            out["skipped"] = torch.tensor(len(skipped))
            out["skipped_files"] = "\n".join(skipped)
            return out
        raise BadSampleError(f"every one of the {len(self.samples)} samples is bad (on_bad_sample='skip' has "
                             f"nothing to use instead), e.g. {skipped[0].split(chr(9), 1)[-1]}")

    def _static_label(self, sample: Sample, size: tuple[int, int]) -> Image.Image:
        path = self.pseudo_dir / f"{sample.name}.png"
        try:
            with Image.open(path) as file:
                static = file.copy()
        except MemoryError:
            raise
        except Exception as error:
            raise BadSampleError(f"static pseudo label {str(path)!r} does not decode ({_reason(error)})", path) from error
        if static.size != size:
            raise ValueError(f"expected static labels of size {size} in {self.pseudo_dir}, got {static.size} "
                             f"({str(path)!r})")
        return static

    def _load(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        sample = self.samples[index]
        image = decode_image(sample.image)
        size = short_side_size(image.size, self.resize)
        names, labels = [], []
        if self.labels:
            gt = (read_sample_label(sample, image.size) if sample.label
                  else np.full(image.size[::-1], IGNORE_INDEX, np.uint8))
            names.append("label")
            labels.append(Image.fromarray(gt))
        image, labels = resize_pair(image, labels, size)
        if self.pseudo_dir is not None:
            names.append("static")
            labels.append(self._static_label(sample, size))
        scale = float(rng.choice(self.scales))
        scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        image, labels = resize_pair(image, labels, scaled)
        arrays = [np.asarray(image)] + [np.asarray(lab, dtype=np.uint8) for lab in labels]
        arrays = random_crop(arrays, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        out = {"image": torch.from_numpy(np.ascontiguousarray(arrays[0].transpose(2, 0, 1))),
               "index": torch.tensor(index)}
        for name, array in zip(names, arrays[1:]):
            out[name] = torch.from_numpy(np.ascontiguousarray(array))
        return out


def random_crop(arrays: list[np.ndarray], crop: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Crop the same random crop×crop window from every array; pad (image 0, labels ignore) when smaller."""
    h, w = arrays[0].shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        arrays = [np.pad(a, ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2),
                         constant_values=0 if i == 0 else IGNORE_INDEX) for i, a in enumerate(arrays)]
        h, w = arrays[0].shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    return [a[top:top + crop, left:left + crop] for a in arrays]


class EvalSet(Dataset):
    """Evaluation: image resized to ``size`` = (W, H), train-id label (uint8) at its full resolution.

    A bad file raises :class:`BadSampleError` naming it (``on_bad_sample="error"``). With ``"skip"`` the sample
    is left out of the score: a black image with an all-ignore label of ``size`` (it adds nothing to the
    confusion matrix), and every item carries ``skipped`` (0 or 1) and ``skipped_files`` as in :class:`TrainSet`.
    """

    def __init__(self, samples: Sequence[Sample], *, size: tuple[int, int], on_bad_sample: str = "error") -> None:
        self.samples, self.size = list(samples), tuple(size)
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            out = self._load(index)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                raise
            w, h = self.size
            return {"image": torch.zeros(3, h, w, dtype=torch.uint8),
                    "label": torch.full((h, w), IGNORE_INDEX, dtype=torch.uint8), "index": torch.tensor(index),
                    "skipped": torch.tensor(1), "skipped_files": skip_record(error)}
        if self.on_bad_sample == "skip":
            out["skipped"], out["skipped_files"] = torch.tensor(0), ""
        return out

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = decode_image(sample.image)
        label = read_sample_label(sample, image.size)
        image = np.asarray(image.resize(self.size, Image.BILINEAR))
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(label), "index": torch.tensor(index)}


def pseudo_label_size(sample: Sample, short: int) -> tuple[int, int]:
    """The (W, H) at which the static pseudo labels of ``sample`` are stored (short side ``short``); reads the
    image header only; :class:`BadSampleError` naming the image when it cannot be opened."""
    try:
        with Image.open(sample.image) as image:
            return short_side_size(image.size, short)
    except MemoryError:
        raise
    except Exception as error:
        raise BadSampleError(f"image {str(sample.image)!r} does not open ({_reason(error)})", sample.image) from error


class PseudoLabelSet(Dataset):
    """Target train images resized on the short side (no augmentation), for static pseudo labels.

    A bad image raises :class:`BadSampleError` naming it (``on_bad_sample="error"``); with ``"skip"`` the item
    is a black image of the size the header gives (or 1x1 when even the header is unreadable) with
    ``skipped`` 1 and ``skipped_files``; the caller leaves it out of the thresholds and writes an all-ignore
    label for it (the training set skips that image anyway).
    """

    def __init__(self, samples: Sequence[Sample], *, resize: int, on_bad_sample: str = "error") -> None:
        self.samples, self.resize = list(samples), resize
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            image = decode_image(self.samples[index].image)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                raise
            try:
                w, h = pseudo_label_size(self.samples[index], self.resize)
            except BadSampleError:
                w, h = 1, 1
            return {"image": torch.zeros(3, h, w, dtype=torch.uint8), "index": torch.tensor(index),
                    "skipped": torch.tensor(1), "skipped_files": skip_record(error)}
        image = np.asarray(image.resize(short_side_size(image.size, self.resize), Image.BILINEAR))
        out = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "index": torch.tensor(index)}
        if self.on_bad_sample == "skip":
            out["skipped"], out["skipped_files"] = torch.tensor(0), ""
        return out


WORKER_GRACE_S = 30  # a DataLoader worker lives this long after SIGTERM (see ignore_stop_signals)


def _worker_sigterm(signum, frame) -> None:
    remaining = signal.alarm(WORKER_GRACE_S)  # SIGALRM's default action ends the worker then
    if remaining:
        signal.alarm(remaining)  # a second SIGTERM does not postpone it


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of every DataLoader of the pipeline. A scheduler (SLURM) sends SIGTERM to every process
    of the job: the main process turns it into a checkpoint (after the current step, which may still need a
    batch) and shuts its workers down itself, so a worker must not die first. In a worker, SIGUSR1 is ignored and
    SIGTERM ends it only :data:`WORKER_GRACE_S` seconds later: long enough for the batches of the steps before
    the stop (at most ``min(10, --log-every)`` under torchrun), short enough that a worker which its parent
    terminates at exit still goes (after an error raised in a worker, torch's DataLoader terminates its workers
    at exit: such an exit takes about half a minute). Workers also exit when their parent dies."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def sample_seed(seed: int, stream: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample, a pure function of its place in the stream."""
    return int(np.random.SeedSequence([seed, stream, epoch, position]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, *, seed: int, stream: int, epoch: int, rank: int, world: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of one epoch: ``DistributedSampler`` order (seeded by seed + epoch), full batches only."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed * 1000 + stream)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = []
    for b in range(len(indices) // batch_size):
        chunk = indices[b * batch_size:(b + 1) * batch_size]
        batches.append([(i, sample_seed(seed, stream, epoch, (b * batch_size + j) * world + rank))
                        for j, i in enumerate(chunk)])
    return batches


class _EndlessBatches:
    """A batch sampler over all epochs from ``(epoch, position)`` on; never exhausted (one DataLoader, whose
    workers stay alive across epochs)."""

    def __init__(self, stream: BatchStream) -> None:
        self.stream = stream

    def __iter__(self):
        s = self.stream
        epoch, position = s.epoch, s.position
        while True:
            batches = epoch_batches(len(s.dataset), s.batch_size, seed=s.seed, stream=s.stream, epoch=epoch,
                                    rank=s.rank, world=s.world)
            yield from batches[position:]
            epoch, position = epoch + 1, 0


class BatchStream:
    r"""An endless, resumable stream of training batches over epochs.

    The state is ``(epoch, position)`` in consumed batches; :meth:`state_dict` / :meth:`load_state_dict`
    restore it exactly (prefetched batches are simply produced again). Sharded like ``DistributedSampler``
    when ``world > 1``.

    One ``DataLoader`` serves every epoch (its batch sampler is endless), so worker processes start once and
    stay alive across epochs (``persistent_workers`` also keeps them over a :meth:`restart` that does not
    change the dataset). ``pin_memory=True`` (use it for CUDA) returns page-locked batches, which the trainer
    copies to the GPU with ``non_blocking=True``. Workers ignore SIGTERM/SIGUSR1 (:func:`ignore_stop_signals`).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, stream: int, rank: int = 0, world: int = 1,
                 workers: int = 0, pin_memory: bool = False) -> None:
        if len(dataset) < batch_size * world:
            raise ValueError(
                f"expected at least batch_size x world_size = {batch_size * world} images, got {len(dataset)}"
            )
        self.dataset, self.batch_size, self.seed, self.stream = dataset, batch_size, seed, stream
        self.rank, self.world, self.workers, self.pin_memory = rank, world, workers, pin_memory
        self.epoch, self.position = 0, 0
        self.per_epoch = len(epoch_batches(len(dataset), batch_size, seed=seed, stream=stream, epoch=0, rank=rank,
                                           world=world))
        self._loader: DataLoader | None = None
        self._iter = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if self.position >= self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        self._iter = None  # same dataset: the (persistent) workers are kept

    def restart(self) -> None:
        """Drop prefetched batches and the workers, which hold a copy of the dataset, e.g. after
        ``dataset.pseudo_dir`` changed (once per round); continue at the same position."""
        self._iter, self._loader = None, None

    def close(self) -> None:
        """Shut the worker processes down now (as :meth:`restart`): call it when a run ends on an error, so that
        no worker outlives the main process's own shutdown (the iterator and this stream refer to each other:
        a garbage collection frees the iterator, whose ``__del__`` stops the workers)."""
        import gc

        self.restart()
        gc.collect()

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._loader is None:
            self._loader = DataLoader(self.dataset, batch_sampler=_EndlessBatches(self), num_workers=self.workers,
                                      persistent_workers=self.workers > 0, pin_memory=self.pin_memory,
                                      worker_init_fn=ignore_stop_signals if self.workers > 0 else None)
        if self._iter is None:
            self._iter = iter(self._loader)
        batch = next(self._iter)
        self.position += 1
        if self.position == self.per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self):
        return self
