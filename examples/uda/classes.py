r"""Class tables: the K training classes of a run and how raw label ids map to them.

A :class:`ClassTable` holds, for K ≥ 2 classes (train ids ``0..K-1``):

* ``names`` — one name per train id;
* ``ids`` — per train id, the raw label ids stored in the label files that map to it (several raw ids may
  merge into one class; an empty list is a class this dataset never labels, e.g. terrain in SYNTHIA); the first
  is the class's *output id*, written in label-id prediction PNGs (for Cityscapes: the label ids the Cityscapes
  evaluation server expects);
* ``ignore_ids`` — raw ids that are deliberately unlabelled (mapped to 255, never trained on or scored);
* ``colours`` — one RGB colour per train id (figures, colour renderings of predictions);
* ``unlisted`` — what a raw id that is neither mapped nor ignored means: ``"error"`` (the default for your own
  tables: a ``ValueError`` naming the file and the id, since it is usually a wrong table) or ``"ignore"``
  (the built-in Cityscapes and SYNTHIA tables: their datasets carry many unused ids).

Built-in tables, one per label space (every id mapping of the pipeline is one of these, in one direction:
:attr:`ClassTable.id_to_train_id` and :attr:`ClassTable.output_ids` read it both ways): :data:`CITYSCAPES` (the
19 Cityscapes train classes, Cityscapes label ids, the standard cityscapesScripts palette, the pipeline's one
palette; GTA5 uses the same ids) and :data:`SYNTHIA` (SYNTHIA-RAND-CITYSCAPES class ids to the same 19 classes,
16 of them present; :data:`SYNTHIA_SUBSETS`: the benchmark's 16 and 13 classes).
:meth:`ClassTable.train_id_table` gives the table of files that already hold train ids (ACDC's and Dark
Zurich's ``*_gt_labelTrainIds.png``): the same classes, raw id k → k. How a label file is read through a table:
:mod:`labels`.

Class-table file (JSON, no extra dependency)::

    {
      "name": "my-data",                          (optional; default: the file's stem)
      "classes": [                                (K >= 2 entries, train ids 0..K-1 in this order)
        {"name": "background", "ids": [0],       "colour": [0, 0, 0]},
        {"name": "road",       "ids": [7, 9],    "colour": [128, 64, 128]},
        {"name": "car",        "ids": [26]}       ("colour" optional: a fixed default palette)
      ],
      "ignore_ids": [255],                        (optional; raw ids mapped to ignore)
      "unlisted": "error"                         (optional; "error" or "ignore")
    }

An entry may also give ``"train_id"``; the train ids must then be exactly ``0..K-1``, each once (entries are
ordered by them). Raw ids are integers in ``0..65535`` (8-bit or 16-bit single-channel PNGs); K ≤ 255 so that
train ids and the ignore value 255 fit a byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from protocl import IGNORE_INDEX

MAX_RAW_ID = 2**16 - 1
UNLISTED = ("error", "ignore")

# the 19 Cityscapes train classes (cityscapesScripts' labels.py), their label ids and colours
CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
# Cityscapes label ids 0..33 outside the 19 (unlabeled, ego vehicle, ..., license plate is -1 and not stored)
CITYSCAPES_IGNORE_IDS = tuple(i for i in range(34) if i not in CITYSCAPES_LABEL_IDS)
# SYNTHIA-RAND-CITYSCAPES class ids (first channel of GT/LABELS) per Cityscapes train id; terrain (16),
# truck (18) and train (20) are in SYNTHIA's id list but never used, so they are not mapped here
SYNTHIA_IDS = {0: 3, 1: 4, 2: 2, 3: 21, 4: 5, 5: 7, 6: 15, 7: 9, 8: 6, 10: 1, 11: 10, 12: 17, 13: 8, 15: 19,
               17: 12, 18: 11}
SYNTHIA_IGNORE_IDS = (0, 13, 14, 16, 18, 20, 22)


def default_palette(k: int) -> tuple[tuple[int, int, int], ...]:
    """``k`` distinct RGB colours: the Cityscapes palette first, then the PASCAL VOC bit-interleaved palette."""
    colours = list(CITYSCAPES_PALETTE[:k])
    i = 1
    while len(colours) < k:
        r = g = b = 0
        c = i
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        if (r, g, b) not in colours:
            colours.append((r, g, b))
        i += 1
    return tuple(colours)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass(frozen=True, eq=True)
class ClassTable:
    """K classes, their raw label ids, ignored raw ids and colours (see the module docstring).

    Build it with :meth:`from_classes`, :meth:`from_dict` or :meth:`from_file` (they validate); the fields are
    tuples, so a table is hashable and pickles into DataLoader workers.
    """

    name: str
    names: tuple[str, ...]
    ids: tuple[tuple[int, ...], ...]
    ignore_ids: tuple[int, ...] = ()
    colours: tuple[tuple[int, int, int], ...] = ()
    unlisted: str = "error"

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_classes(cls, name: str, names: Sequence[str], ids: Sequence[Iterable[int]], *,
                     ignore_ids: Iterable[int] = (), colours: Sequence[Sequence[int]] | None = None,
                     unlisted: str = "error") -> ClassTable:
        """A table from per-class names and raw ids (train id = position); ``colours=None``: default palette."""
        names = tuple(names)
        if colours is None:
            colours = default_palette(len(names))
        if not isinstance(colours, (list, tuple, np.ndarray)):
            raise ValueError(f"expected colours to be a list of K RGB triples, got {type(colours).__name__}")
        if len(ids) != len(names):
            raise ValueError(f"expected one list of raw ids per class name in class table {name!r} "
                             f"({len(names)} names), got {len(ids)} lists")
        ids = tuple(tuple(_raw_ids(v, f"ids of class {n!r}")) for n, v in zip(names, ids))
        return cls(str(name), names, tuple(ids), tuple(_raw_ids(ignore_ids, "ignore_ids")),
                   tuple(tuple(c) if isinstance(c, (list, tuple, np.ndarray)) else c for c in colours), unlisted)

    @classmethod
    def from_dict(cls, spec: Mapping, *, source: str = "class table") -> ClassTable:
        """A table from the JSON structure of a class-table file; ``ValueError`` naming ``source`` if invalid."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"expected {source} to be a JSON object with a 'classes' list, got {type(spec).__name__}")
        unknown = sorted(set(spec) - {"name", "classes", "ignore_ids", "unlisted"})
        if unknown:
            raise ValueError(f"expected {source} keys among name, classes, ignore_ids, unlisted, got {unknown}")
        entries = spec.get("classes")
        if not isinstance(entries, list):
            raise ValueError(f"expected {source} to have a 'classes' list, got {type(entries).__name__}")
        if not all(isinstance(e, Mapping) for e in entries):
            raise ValueError(f"expected every entry of {source} 'classes' to be an object with name and ids")
        for i, entry in enumerate(entries):
            missing = [k for k in ("name", "ids") if k not in entry]
            extra = sorted(set(entry) - {"name", "ids", "colour", "color", "train_id"})
            if missing or extra:
                raise ValueError(f"expected {source} class entry {i} to have name and ids (optional colour, "
                                 f"train_id), got keys {sorted(entry)}")
        if any("train_id" in e for e in entries):
            if not all("train_id" in e for e in entries):
                raise ValueError(f"expected train_id in every class entry of {source} or in none")
            by_train: dict[int, list[str]] = {}
            for e in entries:
                if not _is_int(e["train_id"]):
                    raise ValueError(f"expected an integer train_id for class {e['name']!r} in {source}, got "
                                     f"{e['train_id']!r}")
                by_train.setdefault(int(e["train_id"]), []).append(str(e["name"]))
            for train_id, names in by_train.items():
                if len(names) > 1:
                    raise ValueError(f"expected one name per train id in {source}, got train id {train_id} for "
                                     f"{names}")
            if sorted(by_train) != list(range(len(entries))):
                raise ValueError(f"expected the train ids of {source} to be 0..{len(entries) - 1}, got "
                                 f"{sorted(by_train)}")
            entries = sorted(entries, key=lambda e: int(e["train_id"]))
        colours = None
        if any(("colour" in e or "color" in e) for e in entries):
            if not all(("colour" in e or "color" in e) for e in entries):
                raise ValueError(f"expected a colour in every class entry of {source} or in none")
            colours = [e.get("colour", e.get("color")) for e in entries]
        return cls.from_classes(spec.get("name", "custom"), [e["name"] for e in entries],
                                [e["ids"] for e in entries], ignore_ids=spec.get("ignore_ids", ()),
                                colours=colours, unlisted=spec.get("unlisted", "error"))

    @classmethod
    def from_file(cls, path: str | Path) -> ClassTable:
        """Read a class-table JSON file (format in the module docstring)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"expected --class-table to name a class-table JSON file, got {str(path)!r} (not a file)")
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"expected {str(path)!r} to be a JSON class table, got invalid JSON: {error}") from None
        if isinstance(spec, dict):
            spec = {"name": path.stem, **spec}
        return cls.from_dict(spec, source=f"class table {str(path)!r}")

    def to_dict(self) -> dict:
        """The JSON structure of this table (:meth:`from_dict` reads it back to an equal table)."""
        return {"name": self.name,
                "classes": [{"name": n, "ids": list(i), "colour": list(c)}
                            for n, i, c in zip(self.names, self.ids, self.colours)],
                "ignore_ids": list(self.ignore_ids), "unlisted": self.unlisted}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def train_id_table(self) -> ClassTable:
        """The table of label files that already hold this table's train ids (raw id k -> k, 255 ignored, any
        other value an error): ACDC's and Dark Zurich's ``*_gt_labelTrainIds.png`` for :data:`CITYSCAPES`."""
        return self._train_id_table

    @cached_property
    def _train_id_table(self) -> ClassTable:
        return ClassTable(f"{self.name} (train ids)", self.names, tuple((k,) for k in range(self.num_classes)),
                          (IGNORE_INDEX,), self.colours, "error")

    # ------------------------------------------------------------------------------------------- queries
    @property
    def num_classes(self) -> int:
        return len(self.names)

    K = num_classes

    @property
    def output_ids(self) -> tuple[int, ...]:
        """Per train id, the raw id written in label-id predictions: the first of the class's ids (a class
        without raw ids, absent from this dataset's labels, gets the first ignore id, else 0)."""
        fill = self.ignore_ids[0] if self.ignore_ids else 0
        return tuple(i[0] if i else fill for i in self.ids)

    @cached_property
    def id_to_train_id(self) -> dict[int, int]:
        return {raw: k for k, raws in enumerate(self.ids) for raw in raws}

    @cached_property
    def _luts(self) -> tuple[np.ndarray, np.ndarray]:
        lut = np.full(MAX_RAW_ID + 1, IGNORE_INDEX, dtype=np.uint8)
        known = np.zeros(MAX_RAW_ID + 1, dtype=bool)
        for raw, k in self.id_to_train_id.items():
            lut[raw], known[raw] = k, True
        known[list(self.ignore_ids)] = True
        if self.unlisted == "ignore":
            known[:] = True
        lut.setflags(write=False)
        known.setflags(write=False)
        return lut, known

    def lut(self, bits: int = 8) -> np.ndarray:
        """The (2**bits,) uint8 lookup table raw id -> train id (255 for ignored and unlisted ids); bits 8 or 16."""
        if bits not in (8, 16):
            raise ValueError(f"expected bits 8 or 16, got {bits!r}")
        top = max(self.id_to_train_id, default=0)
        if bits == 8 and top > 255:
            raise ValueError(f"expected raw ids <= 255 for an 8-bit lookup table, got class table {self.name!r} "
                             f"with ids up to {top}: use bits=16")
        return self._luts[0][: 2**bits]

    def map_ids(self, raw: np.ndarray, *, source: str = "label map") -> np.ndarray:
        """Raw label ids (any integer array) -> uint8 train ids (255 ignore).

        Raises ``ValueError`` naming ``source`` (the file) and the ids if the array holds ids outside
        ``0..65535`` or, with ``unlisted="error"``, ids the table neither maps nor ignores.
        """
        raw = np.asarray(raw)
        if raw.dtype.kind not in "ui":
            raise ValueError(f"expected integer label ids in {source}, got dtype {raw.dtype}")
        lut, known = self._luts
        if raw.dtype not in (np.uint8, np.uint16):
            low, high = (int(raw.min()), int(raw.max())) if raw.size else (0, 0)
            if low < 0 or high > MAX_RAW_ID:
                raise ValueError(f"expected label ids in 0..{MAX_RAW_ID} in {source}, got values in {low}..{high}")
            raw = raw.astype(np.uint16)
        if self.unlisted == "error":
            bad = ~known[raw]
            if bad.any():
                values = np.unique(raw[bad])
                shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if len(values) > 10 else "")
                raise ValueError(
                    f"expected only label ids of class table {self.name!r} in {source} (mapped: "
                    f"{int_ranges(self.id_to_train_id)}; ignored: {int_ranges(self.ignore_ids) or 'none'}), got "
                    f"unmapped id(s) {shown} on {int(bad.sum())} pixels"
                )
        return lut[raw]

    def colour_lut(self) -> np.ndarray:
        """(256, 3) uint8: train id -> colour; 255 (ignore) and ids >= K black."""
        lut = np.zeros((256, 3), dtype=np.uint8)
        lut[: self.num_classes] = np.asarray(self.colours, dtype=np.uint8)
        return lut

    def colorize(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> (H, W, 3) uint8 colours (ignore black)."""
        return self.colour_lut()[np.asarray(train_ids).clip(0, 255).astype(np.uint8)]

    def to_output_ids(self, train_ids: np.ndarray) -> np.ndarray:
        """(H, W) train ids -> output (label) ids: uint8 when they all fit a byte, else uint16; train id 255
        becomes the first ignore id (0 when none is declared)."""
        fill = self.ignore_ids[0] if self.ignore_ids else 0
        dtype = np.uint8 if max(max(self.output_ids), fill) <= 255 else np.uint16
        lut = np.full(256, fill, dtype=dtype)
        lut[: self.num_classes] = self.output_ids
        return lut[np.asarray(train_ids).astype(np.uint8)]

    def check_compatible(self, other: ClassTable, *, what: str = "source and target") -> None:
        """``ValueError`` unless ``other`` has the same K and the same class names in the same order (the two
        domains of a run must share the train ids)."""
        if self.num_classes != other.num_classes:
            raise ValueError(f"expected the same number of classes K for {what}, got K={self.num_classes} "
                             f"({self.name!r}) and K={other.num_classes} ({other.name!r})")
        for k, (a, b) in enumerate(zip(self.names, other.names)):
            if a.strip().lower() != b.strip().lower():
                raise ValueError(f"expected the same class at every train id for {what}, got {a!r} "
                                 f"({self.name!r}) and {b!r} ({other.name!r}) at train id {k}")


def _raw_ids(values, what: str) -> list[int]:
    if _is_int(values):
        values = [values]
    if not isinstance(values, (list, tuple, range, np.ndarray)):
        raise ValueError(f"expected {what} to be a list of integer label ids, got {values!r}")
    out = []
    for v in values:
        if not _is_int(v):
            raise ValueError(f"expected {what} to be integer label ids, got {v!r}")
        if not 0 <= int(v) <= MAX_RAW_ID:
            raise ValueError(f"expected {what} in 0..{MAX_RAW_ID}, got {int(v)}")
        out.append(int(v))
    return out


def int_ranges(ids, sep: str = ",") -> str:
    """Sorted integers as compact ranges: ``[0, 1, 2, 5]`` -> ``"0-2,5"`` (label ids in messages; rounds)."""
    values = sorted(set(int(i) for i in ids))
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return sep.join(parts)


def _validate(t: ClassTable) -> None:
    k = len(t.names)
    if k < 2:
        raise ValueError(f"expected at least K=2 classes in class table {t.name!r}, got K={k}")
    if k > 255:
        raise ValueError(f"expected at most K=255 classes in class table {t.name!r} (train ids and the ignore "
                         f"value 255 share a byte), got K={k}")
    if t.unlisted not in UNLISTED:
        raise ValueError(f"expected unlisted in {UNLISTED} in class table {t.name!r}, got {t.unlisted!r}")
    if not all(isinstance(n, str) and n.strip() for n in t.names):
        raise ValueError(f"expected non-empty class names in class table {t.name!r}, got {list(t.names)}")
    seen: dict[str, int] = {}
    for train_id, n in enumerate(t.names):
        key = n.strip().lower()
        if key in seen:
            raise ValueError(f"expected one train id per class name in class table {t.name!r}, got {n!r} at train "
                             f"ids {seen[key]} and {train_id}")
        seen[key] = train_id
    if len(t.ids) != k:
        raise ValueError(f"expected one list of raw ids per class in class table {t.name!r} (K={k}), got "
                         f"{len(t.ids)}")
    owner: dict[int, str] = {}
    for n, raws in zip(t.names, t.ids):
        for raw in raws:
            if not _is_int(raw) or not 0 <= raw <= MAX_RAW_ID:
                raise ValueError(f"expected raw ids in 0..{MAX_RAW_ID} for class {n!r} in class table "
                                 f"{t.name!r}, got {raw!r}")
            if raw in owner and owner[raw] != n:
                raise ValueError(f"expected each raw label id to map to one class in class table {t.name!r}, got "
                                 f"id {raw} for {owner[raw]!r} and {n!r}")
            owner[raw] = n
    both = sorted(set(owner) & set(t.ignore_ids))
    if both:
        raise ValueError(f"expected ignore_ids disjoint from the mapped ids in class table {t.name!r}, got "
                         f"{both} in both (class {owner[both[0]]!r})")
    colours = np.asarray(t.colours, dtype=object)
    if colours.shape != (k, 3):
        raise ValueError(f"expected colours of shape (K, 3) = ({k}, 3) (one RGB triple per class) in class table "
                         f"{t.name!r}, got shape {colours.shape}")
    if not all(_is_int(c) and 0 <= c <= 255 for c in colours.flat):
        raise ValueError(f"expected colours as integers in 0..255 in class table {t.name!r}, got {list(t.colours)}")


CITYSCAPES = ClassTable.from_classes("cityscapes", CITYSCAPES_NAMES, [(i,) for i in CITYSCAPES_LABEL_IDS],
                                     ignore_ids=CITYSCAPES_IGNORE_IDS, colours=CITYSCAPES_PALETTE, unlisted="ignore")
CITYSCAPES_TRAIN_IDS = CITYSCAPES.train_id_table()

SYNTHIA = ClassTable(
    "synthia", CITYSCAPES_NAMES,
    # the three classes SYNTHIA lacks have no raw id: the table keeps K = 19
    tuple((SYNTHIA_IDS[k],) if k in SYNTHIA_IDS else () for k in range(19)),
    SYNTHIA_IGNORE_IDS, CITYSCAPES_PALETTE, "ignore",
)
# the SYNTHIA benchmark's classes (train ids): the 16 that SYNTHIA labels, and the usual 13 (without wall, fence
# and pole); the evaluation reports the mIoU over both
SYNTHIA_CLASSES_16 = tuple(sorted(SYNTHIA_IDS))
SYNTHIA_CLASSES_13 = tuple(k for k in SYNTHIA_CLASSES_16 if k not in (3, 4, 5))
SYNTHIA_SUBSETS = {"16": SYNTHIA_CLASSES_16, "13": SYNTHIA_CLASSES_13}

BUILTIN = {"cityscapes": CITYSCAPES, "synthia": SYNTHIA}


def load_table(spec: str | Path | ClassTable | None) -> ClassTable:
    """``None`` -> :data:`CITYSCAPES`; a built-in name (``cityscapes``, ``synthia``); a path to a JSON file."""
    if spec is None:
        return CITYSCAPES
    if isinstance(spec, ClassTable):
        return spec
    if str(spec) in BUILTIN:
        return BUILTIN[str(spec)]
    return ClassTable.from_file(spec)
