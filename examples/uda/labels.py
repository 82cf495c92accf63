r"""Decoding a sample's files: images, and labels through one path for every layout.

A label file becomes train ids in four steps, the same for every dataset: :func:`decode_label_ids` (the raw ids
at the file's full bit depth, the file's mode checked), :func:`check_label_ids` (ids the format cannot map),
:func:`to_train_ids` (through the format's class table) and, in :func:`read_label`, a nearest resize to the
image when the sizes differ by a rescale (:func:`check_label_size`). What differs between datasets is data, a
:class:`LabelFormat`:

* :data:`CITYSCAPES_IDS` (``"cityscapes"``): 8-bit Cityscapes label ids in a single-channel map (GTA5
  ``labels/*.png``, Cityscapes ``*_gtFine_labelIds.png``); an id above 255 (e.g. an instance-id file, id * 1000
  + instance) is an error, the unlisted ids 0-255 are ignored (the protocl method spec §4);
* :data:`SYNTHIA_IDS` (``"synthia"``): SYNTHIA-RAND-CITYSCAPES class ids in channel 1 of a 16-bit RGB PNG
  (``GT/LABELS``; channel 2 holds an instance id). Pillow reduces 16-bit RGB PNGs to their high bytes, which
  would turn every class id into 0, so :func:`read_png_channels` decodes them at full depth;
* :data:`CITYSCAPES_TRAINIDS`: files that already hold the 19 train ids (ACDC's and Dark Zurich's
  ``*_gt_labelTrainIds.png``), read as such and never mapped a second time;
* ``LabelFormat(table)``: raw ids of your own :class:`classes.ClassTable` (8- or 16-bit, single channel).

A :class:`datasets.Sample` names its format: a :class:`LabelFormat`, or the name of a built-in one
(:data:`FORMATS`). Bad files raise :class:`BadSampleError` (a ``ValueError``) naming the file and the reason:
an image or label that does not decode, a label in the wrong mode (an RGB colour rendering where an id map
belongs; SYNTHIA labels must be 16-bit RGB), with ids its format cannot map, or whose size differs from its
image by more than a rescale (allowed: the same aspect ratio within :data:`ASPECT_TOLERANCE`, e.g. the few GTA5
labels whose size differs from their image).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import CITYSCAPES, SYNTHIA, ClassTable

# a label may differ in size from its image when it is a rescale of it: same aspect ratio within 5 %
ASPECT_TOLERANCE = 0.05
_BITS = {"I": 32, "F": 32, "I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16, "RGB;16": 16, "RGBA;16": 16}


class BadSampleError(ValueError):
    """A file of a dataset that cannot be used; the message names the path and the reason, :attr:`path` holds
    the path (None when the error was re-raised from a DataLoader worker, whose message still names it)."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.path = None if path is None else str(path)


def error_reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


@dataclass(frozen=True)
class LabelFormat:
    """How to turn a label file into train ids.

    ``table``: the classes; ``encoding``: ``"ids"`` (raw ids mapped through the table) or ``"trainids"`` (the
    file already holds the table's train ids 0..K-1 and 255 for ignore; any other value is an error naming the
    file); ``channel``: which channel of a multi-channel label PNG holds the ids (``None``: single-channel
    files only). The built-in formats also restrict the file: ``modes``, the modes accepted (``"RGB;16"``: a
    16-bit RGB PNG; empty: any) with ``mode_error``, the message when another mode is found (``{mode}``,
    ``{bits}`` and ``{hint}`` are filled in); ``max_id`` with ``id_range``, the largest raw id a file may hold
    and how the message names the allowed ids.
    """

    table: ClassTable
    encoding: str = "ids"
    channel: int | None = None
    modes: tuple[str, ...] = ()
    mode_error: str = ""
    max_id: int | None = None
    id_range: str = ""

    def __post_init__(self) -> None:
        if self.encoding not in ("ids", "trainids"):
            raise ValueError(f"expected encoding 'ids' or 'trainids', got {self.encoding!r}")

    @cached_property
    def reading_table(self) -> ClassTable:
        """The table the file's values go through (the train-id table for ``encoding="trainids"``)."""
        return self.table if self.encoding == "ids" else self.table.train_id_table()


CITYSCAPES_IDS = LabelFormat(
    CITYSCAPES, "ids", modes=("L", "P", "I", "I;16"),
    mode_error="expected a single-channel id map (mode L, P or I: Cityscapes label ids, as GTA5 labels/*.png and "
               "*_gtFine_labelIds.png hold them), got mode {mode}{hint}",
    max_id=255, id_range="8-bit Cityscapes label ids 0-255 (not an instance-id file, id * 1000 + instance)")
SYNTHIA_IDS = LabelFormat(
    SYNTHIA, "ids", channel=0, modes=("RGB;16", "RGBA;16"),
    mode_error="expected a 16-bit RGB PNG (SYNTHIA GT/LABELS, class id in channel 1), got {bits}-bit mode {mode}")
CITYSCAPES_TRAINIDS = LabelFormat(CITYSCAPES, "trainids")
FORMATS = {"cityscapes": CITYSCAPES_IDS, "synthia": SYNTHIA_IDS}  # the formats a Sample may name by a string
LABEL_FORMATS = tuple(FORMATS)


def as_format(spec: str | LabelFormat) -> LabelFormat:
    """The :class:`LabelFormat` of a sample: itself, or the built-in format a name (:data:`FORMATS`) stands for."""
    if isinstance(spec, LabelFormat):
        return spec
    if isinstance(spec, str) and spec in FORMATS:
        return FORMATS[spec]
    raise ValueError(f"expected label_format in {LABEL_FORMATS} or a LabelFormat, got {spec!r}")


def label_table(spec: str | LabelFormat) -> ClassTable:
    """The class table (train classes) of a sample's label format."""
    return as_format(spec).table


def decode_image(path: str | Path) -> Image.Image:
    """The RGB image at ``path``, fully decoded; :class:`BadSampleError` naming the path when it does not decode."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")  # convert() decodes every pixel (a truncated file fails here)
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for broken files
        raise BadSampleError(f"image {str(path)!r} does not decode ({error_reason(error)})", path) from error


def _rgb16_rawmode(image: Image.Image) -> str | None:
    """The raw mode (``"RGB;16B"``, ``"RGBA;16B"``) of a 16-bit RGB(A) PNG, None for any other file."""
    tile = image.tile[0] if len(image.tile) == 1 else None
    rawmode = tile[3] if tile is not None and isinstance(tile[3], str) else None
    return rawmode if image.mode in ("RGB", "RGBA") and rawmode in ("RGB;16B", "RGBA;16B") else None


def read_png_channels(path: str | Path) -> np.ndarray:
    """The pixel values of a PNG at their full bit depth: ``(H, W)`` or ``(H, W, C)``, uint8 or uint16.

    Pillow decodes 16-bit RGB(A) PNGs to 8 bits by keeping the high byte of each sample. Here such a file is
    decoded twice by Pillow's own decoder, once keeping the high and once the low byte of every sample
    (big-endian and little-endian raw modes), and the two are recombined: exact 16-bit values at C speed.
    """
    with Image.open(path) as image:
        rawmode = _rgb16_rawmode(image)
        if rawmode is None:
            return np.asarray(image)
    planes = []
    for raw in (rawmode, rawmode.replace(";16B", ";16L")):  # high bytes, then low bytes
        with Image.open(path) as image:
            tile = image.tile[0]
            image.tile = [tile._replace(args=raw) if hasattr(tile, "_replace") else (*tile[:3], raw)]
            planes.append(np.asarray(image).astype(np.uint16))
    return (planes[0] << 8) | planes[1]


def decode_label_ids(path: str | Path, label_format: str | LabelFormat = "cityscapes") -> np.ndarray:
    """The raw ids of a label file, ``(H, W)``, unmapped, at the file's full bit depth (the format's
    ``channel`` of a multi-channel PNG). :class:`BadSampleError` naming the path when the file does not decode,
    is in a mode the format does not accept (e.g. an RGB colour rendering where an id map belongs), or has
    channels where a single-channel id map belongs."""
    fmt = as_format(label_format)
    try:
        with Image.open(path) as image:  # the mode is in the header: checked before any pixel is decoded
            rgb16 = _rgb16_rawmode(image) is not None
            mode = image.mode + (";16" if rgb16 else "")
            if fmt.modes and mode not in fmt.modes:
                hint = " (a colour rendering?)" if image.mode in ("RGB", "RGBA") else ""
                text = fmt.mode_error.format(mode=image.mode, bits=_BITS.get(mode, 8), hint=hint)
                raise BadSampleError(f"label {str(path)!r}: {text}", path)
            ids = None if rgb16 else np.asarray(image)
        if ids is None:
            ids = read_png_channels(path)
    except BadSampleError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ... for broken files
        raise BadSampleError(f"label {str(path)!r} does not decode ({error_reason(error)})", path) from error
    if ids.ndim == 3:
        if fmt.channel is None:
            raise BadSampleError(
                f"label {str(path)!r}: expected a single-channel label map (8- or 16-bit ids), got {ids.shape[2]} "
                "channels (a colour rendering is not a label map)", path)
        ids = ids[..., fmt.channel]
    if ids.dtype == np.int32:  # Pillow's "I" mode (e.g. some 16-bit writers)
        ids = ids.astype(np.int64)
    return ids


def to_train_ids(ids: np.ndarray, path: str | Path, label_format: str | LabelFormat = "cityscapes") -> np.ndarray:
    """Raw ids -> uint8 train ids (255 ignore) through the format's table. :class:`BadSampleError` naming the path
    and the values when ``ids`` hold a value above the format's ``max_id`` or one its table neither maps nor
    ignores (for ``encoding="trainids"``: anything but 0..K-1 and 255)."""
    fmt = as_format(label_format)
    top = fmt.max_id
    if top is not None and ids.dtype != np.uint8 and ids.size and (int(ids.min()) < 0 or int(ids.max()) > top):
        bad = (ids < 0) | (ids > top)
        values = np.unique(ids[bad])
        shown = ", ".join(str(int(v)) for v in values[:8]) + (", ..." if len(values) > 8 else "")
        raise BadSampleError(f"label {str(path)!r}: expected {fmt.id_range}, got {shown} on {int(bad.sum())} "
                             "pixels", path)
    try:
        return fmt.reading_table.map_ids(ids, source="the file")
    except ValueError as error:
        raise BadSampleError(f"label {str(path)!r}: {error}", path) from None


def check_label_ids(ids: np.ndarray, path: str | Path, label_format: str | LabelFormat = "cityscapes") -> None:
    """:class:`BadSampleError` naming the path and the values when ``ids`` hold a value the format cannot map
    (:func:`to_train_ids`)."""
    to_train_ids(ids, path, label_format)


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


def read_label(path: str | Path, size: tuple[int, int], label_format: str | LabelFormat = "cityscapes",
               image_path: str | Path | None = None) -> np.ndarray:
    """Train ids (uint8, 255 ignore) of a label file at ``size`` = (W, H), nearest-resized when it differs.

    ``label_format``: a :class:`LabelFormat` or a built-in one's name (``"cityscapes"``: 8-bit Cityscapes label
    ids, GTA5 uses them too; ``"synthia"``: 16-bit SYNTHIA class ids in the first channel).
    :class:`BadSampleError` naming the file when it does not decode, is in the wrong mode, holds ids the format
    cannot map or cannot be resized to ``size`` (another aspect ratio; ``image_path`` is named in that message).
    """
    train = to_train_ids(decode_label_ids(path, label_format), path, label_format)
    label_size = (train.shape[1], train.shape[0])
    if label_size != tuple(size):  # a few GTA5 labels differ in size from their image
        check_label_size(label_size, size, path, image_path if image_path is not None else "?")
        train = np.asarray(Image.fromarray(train).resize(tuple(size), Image.NEAREST))
    return train


def read_sample_label(sample, size: tuple[int, int]) -> np.ndarray:
    """The train-id label map of ``sample`` (a :class:`datasets.Sample`) at ``size`` = (W, H)."""
    return read_label(sample.label, size, sample.label_format, sample.image)
