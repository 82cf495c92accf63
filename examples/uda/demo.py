r"""Every writer of demo data: small deterministic datasets in the GTA5, SYNTHIA, Cityscapes, ACDC, Dark
Zurich and folder layouts (the embedded demo, the tests and the study's shifts).

The scenes and renderings are :mod:`scenes`' (one street-scene generator; a flat "source" and a textured
"target" rendering; adverse conditions on top of the target rendering). Labels are written as the datasets
release them, so the real listers and label formats (:mod:`datasets`, :mod:`labels`) run unchanged:

* GTA5 and Cityscapes: Cityscapes label ids (``labels/*.png``, ``*_gtFine_labelIds.png``);
* SYNTHIA: 16-bit PNGs with SYNTHIA class ids in the first channel and an instance id in the second
  (:func:`write_png16`); SYNTHIA has no terrain class, so in its layout the source scenes' terrain becomes
  vegetation;
* ACDC and Dark Zurich: ``*_gt_labelTrainIds.png`` (train ids, 255 ignore) *and* ``*_gt_labelIds.png`` (label
  ids), both present as in the releases, so that a reader that takes the wrong file or maps train ids a second
  time gets a different answer;
* folder: raw ids of a custom class table (K = 5 by default, 8- or 16-bit PNGs), with the table as
  ``classes.json``.

:func:`write_demo_dataset` writes the embedded GTA5 (or SYNTHIA) -> Cityscapes demo, :func:`write_demo` the
other demo pairs (Cityscapes -> ACDC, Cityscapes -> Dark Zurich, folder -> folder), :func:`write_all` every
layout in small. The source and target images drawn for one seed are the same whichever source layout is
written; everything is a pure function of the seed. From ``examples/``, ``python -m uda.demo OUT`` writes
:func:`write_all` under ``OUT``.
"""

from __future__ import annotations

import argparse
import struct
import sys
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .classes import CITYSCAPES, SYNTHIA_IDS, ClassTable
from .datasets import ACDC_CONDITIONS
from .scenes import (
    BUILDING, CAR, PERSON, POLE, ROAD, SIDEWALK, SIGN, SKY, TERRAIN, VEGETATION, make_scene, render_condition,
    render_source, render_target,
)

SOURCE_LAYOUTS = ("gta5", "synthia")


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids (uint8); 255 and unknown ids -> 0 ("unlabeled", ignored by the reader)."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[: CITYSCAPES.num_classes] = CITYSCAPES.output_ids
    return lut[train_ids]


def write_gta5_layout(root: str | Path, samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``(image (H, W, 3) uint8, train ids (H, W))`` pairs as ``root/images/%05d.png`` and
    ``root/labels/%05d.png`` (Cityscapes label ids), the GTA5 layout; ``samples`` is consumed in order."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(samples):
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png")
        Image.fromarray(to_label_ids(label)).save(root / "labels" / f"{i:05d}.png")
    return root


def write_cityscapes_layout(root: str | Path, split: str, city: str,
                            samples: Iterable[tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write ``(image, train ids)`` pairs in the Cityscapes layout: ``root/leftImg8bit/<split>/<city>/
    <city>_%06d_000019_leftImg8bit.png`` and ``root/gtFine/<split>/<city>/..._gtFine_labelIds.png``."""
    root = Path(root)
    (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
    (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(samples):
        stem = f"{city}_{i:06d}_000019"
        Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        Image.fromarray(to_label_ids(label)).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png")
    return root


def _to_synthia_label(train_ids: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint16 SYNTHIA label: class id, instance id (>= 256 on cars and people, else 0), 0."""
    lut = np.zeros(256, dtype=np.uint16)  # SYNTHIA id 0 = void -> ignored by the reader
    for train_id, synthia_id in SYNTHIA_IDS.items():
        lut[train_id] = synthia_id
    label = np.zeros(train_ids.shape + (3,), dtype=np.uint16)
    label[..., 0] = lut[train_ids]
    label[..., 1] = np.where(np.isin(train_ids, (PERSON, CAR)), 256 + train_ids.astype(np.uint16), 0)
    return label


def write_png16(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` (H, W, 3) uint16 as a 16-bit RGB PNG (Pillow cannot write 16-bit RGB)."""
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint16:
        raise ValueError(f"expected a (H, W, 3) uint16 array, got {array.shape} {array.dtype}")
    h, w, _ = array.shape
    rows = array.astype(">u2").reshape(h, w * 3).view(np.uint8)  # big-endian samples, as PNG stores them
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter type 0 on each row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB), no interlace
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
                     + chunk(b"IEND", b""))
    return path


def write_demo_dataset(root: str | Path, *, seed: int = 0, source_images: int = 160, target_train: int = 160,
                       target_val: int = 60, source_size: tuple[int, int] = (128, 72),
                       target_size: tuple[int, int] = (128, 64), source: str = "gta5") -> tuple[Path, Path]:
    """Write the demo dataset under ``root``: the source in the GTA5 layout (``root/gta5``) or, with
    ``source="synthia"``, in the SYNTHIA-RAND-CITYSCAPES layout (``root/synthia``), the target in the Cityscapes
    layout (``root/cityscapes``).

    Sizes are (W, H). Returns ``(source_root, cityscapes_root)``. Skips writing when a complete copy for the same
    arguments is already there (a ``.complete`` marker holds them).
    """
    if source not in SOURCE_LAYOUTS:
        raise ValueError(f"expected source in {SOURCE_LAYOUTS}, got {source!r}")
    root = Path(root)
    marker = root / ".complete"
    stamp = f"{seed} {source_images} {target_train} {target_val} {source_size} {target_size} v1"
    if source != "gta5":
        stamp += f" {source}"
    src, cs = root / source, root / "cityscapes"
    if marker.is_file() and marker.read_text() == stamp:
        return src, cs
    marker.unlink(missing_ok=True)
    rng = np.random.default_rng([seed, 1234])

    def source_samples():
        for _ in range(source_images):
            label = make_scene(rng, source_size[1], source_size[0])
            if source == "synthia":
                label[label == TERRAIN] = VEGETATION  # SYNTHIA has no terrain class
            yield render_source(label, rng), label

    def target_samples(count: int):
        for _ in range(count):
            label = make_scene(rng, target_size[1], target_size[0])
            yield render_target(label, rng), label

    if source == "gta5":
        write_gta5_layout(src, source_samples())
    else:
        (src / "RGB").mkdir(parents=True, exist_ok=True)
        (src / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(source_samples()):
            Image.fromarray(image).save(src / "RGB" / f"{i:07d}.png")
            write_png16(src / "GT" / "LABELS" / f"{i:07d}.png", _to_synthia_label(label))
    for split, count in (("train", target_train), ("val", target_val)):
        write_cityscapes_layout(cs, split, f"demo{split}", target_samples(count))
    marker.write_text(stamp)
    return src, cs


EGO_VEHICLE_ID = 1  # Cityscapes label id of the ego vehicle (ignored): the bottom rows of ACDC-like frames


def _scene(rng: np.random.Generator, size: tuple[int, int], *, ego: bool = False) -> np.ndarray:
    label = make_scene(rng, size[1], size[0])
    if ego:  # an ego-vehicle strip: ignored in the train ids
        label[-max(1, size[1] // 16):] = 255
    return label


def _save_pair(image: np.ndarray, train_ids: np.ndarray, image_path: Path, trainids_path: Path | None,
               labelids_path: Path | None) -> None:
    image_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(image_path)
    if trainids_path is not None:
        trainids_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(train_ids).save(trainids_path)
    if labelids_path is not None:
        labelids_path.parent.mkdir(parents=True, exist_ok=True)
        ids = to_label_ids(train_ids)
        ids[train_ids == 255] = EGO_VEHICLE_ID
        Image.fromarray(ids).save(labelids_path)


def write_cityscapes(root: str | Path, *, seed: int = 0, train: int = 6, val: int = 3,
                     size: tuple[int, int] = (64, 32), condition: str = "clear") -> Path:
    """The Cityscapes layout (``leftImg8bit`` + ``gtFine`` label ids, train and val), clear weather by default."""
    rng = np.random.default_rng([seed, 19, 1])
    for split, count in (("train", train), ("val", val)):
        pairs = []
        for _ in range(count):
            label = _scene(rng, size)
            pairs.append((render_condition(label, condition, rng), label))
        write_cityscapes_layout(root, split, f"demo{split}", pairs)
    return Path(root)


def write_acdc(root: str | Path, *, seed: int = 0, conditions: tuple[str, ...] = ACDC_CONDITIONS, train: int = 4,
               val: int = 2, test: int = 2, size: tuple[int, int] = (64, 32)) -> Path:
    """The ACDC layout: per condition, train/val/test frames of one sequence; train and val labelled (train ids
    and label ids), test images only. Frames end in an ignored ego-vehicle strip, as ACDC's do."""
    root = Path(root)
    for c, condition in enumerate(conditions):
        rng = np.random.default_rng([seed, 19, 2, c])
        for s, (split, count) in enumerate((("train", train), ("val", val), ("test", test))):
            seq = f"GOPR{400 + 10 * c + s:04d}"
            for i in range(count):
                label = _scene(rng, size, ego=True)
                stem = f"{seq}_frame_{i * 7 + 1:06d}"
                gt = root / "gt" / condition / split / seq
                labelled = split != "test"
                _save_pair(render_condition(label, condition, rng), label,
                           root / "rgb_anon" / condition / split / seq / f"{stem}_rgb_anon.png",
                           gt / f"{stem}_gt_labelTrainIds.png" if labelled else None,
                           gt / f"{stem}_gt_labelIds.png" if labelled else None)
    return root


def write_darkzurich(root: str | Path, *, seed: int = 0, train: int = 6, val: int = 3, test: int = 2,
                     day: int = 2, size: tuple[int, int] = (64, 32)) -> Path:
    """The Dark Zurich layout: unlabelled night train frames (plus a few day frames, which are not part of the
    night target), labelled night val frames (train ids and label ids), test frames without labels."""
    root = Path(root)
    rng = np.random.default_rng([seed, 19, 3])
    plan = (("train", "night", "GOPR0351", train, False), ("train", "day", "GOPR0351_ref", day, False),
            ("val", "night", "GOPR0356", val, True), ("test", "night", "GOPR0364", test, False))
    for split, time, seq, count, labelled in plan:
        for i in range(count):
            label = _scene(rng, size, ego=True)
            stem = f"{seq}_frame_{i * 3 + 1:06d}"
            gt = root / "gt" / split / time / seq
            _save_pair(render_condition(label, "night" if time == "night" else "clear", rng), label,
                       root / "rgb_anon" / split / time / seq / f"{stem}_rgb_anon.png",
                       gt / f"{stem}_gt_labelTrainIds.png" if labelled else None,
                       gt / f"{stem}_gt_labelIds.png" if labelled else None)
    return root


# custom classes: K = 5 coarse classes over the demo scenes, with non-contiguous raw ids (0 = unlabelled)
CUSTOM_CLASSES = (
    ("ground", (ROAD, SIDEWALK, TERRAIN), (11, 12, 13), (128, 64, 128)),
    ("structure", (BUILDING, POLE, SIGN), (21, 22, 23), (70, 70, 70)),
    ("vegetation", (VEGETATION,), (31,), (107, 142, 35)),
    ("sky", (SKY,), (41,), (70, 130, 180)),
    ("object", (PERSON, CAR), (51, 52), (220, 20, 60)),
)
CUSTOM_OFFSET_16 = 1000  # 16-bit variant: raw ids + 1000


def custom_table(bits: int = 8) -> ClassTable:
    """The K = 5 table of the custom-classes demo (16-bit: raw ids offset by 1000; 0 ignored in both)."""
    offset = 0 if bits == 8 else CUSTOM_OFFSET_16
    return ClassTable.from_classes(f"demo-custom-{bits}bit", [c[0] for c in CUSTOM_CLASSES],
                                   [[raw + offset for raw in c[2]] for c in CUSTOM_CLASSES], ignore_ids=[0],
                                   colours=[c[3] for c in CUSTOM_CLASSES])


def _to_custom_ids(train_ids: np.ndarray, bits: int) -> np.ndarray:
    offset = 0 if bits == 8 else CUSTOM_OFFSET_16
    lut = np.zeros(256, dtype=np.uint16)
    for _, demo_ids, raws, _ in CUSTOM_CLASSES:
        for demo_id, raw in zip(demo_ids, raws * len(demo_ids) if len(raws) == 1 else raws):
            lut[demo_id] = raw + offset
    ids = lut[train_ids]
    return ids.astype(np.uint8) if bits == 8 else ids


def write_folder(root: str | Path, *, seed: int = 0, bits: int = 8, source: int = 6, train: int = 6, val: int = 3,
                 size: tuple[int, int] = (64, 32)) -> tuple[Path, Path, Path]:
    """A custom-classes dataset in the folder layout: ``root/source/{images,labels}`` (flat rendering, PNG),
    ``root/target/{train,val}/{images,labels}`` (textured rendering, JPEG images) and the class table
    ``root/classes.json``. Returns ``(source_root, target_root, table_path)``."""
    if bits not in (8, 16):
        raise ValueError(f"expected bits 8 or 16, got {bits!r}")
    root = Path(root)
    rng = np.random.default_rng([seed, 19, 4, bits])
    table_path = custom_table(bits).save(root / "classes.json")
    src, tgt = root / "source", root / "target"
    for i in range(source):
        label = _scene(rng, size)
        for d in ("images", "labels"):
            (src / d).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_source(label, rng)).save(src / "images" / f"src_{i:04d}.png")
        Image.fromarray(_to_custom_ids(label, bits)).save(src / "labels" / f"src_{i:04d}.png")
    for split, count in (("train", train), ("val", val)):
        for d in ("images", "labels"):
            (tgt / split / d).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            label = _scene(rng, size)
            Image.fromarray(render_target(label, rng)).save(tgt / split / "images" / f"{split}_{i:04d}.jpg",
                                                            quality=95)
            Image.fromarray(_to_custom_ids(label, bits)).save(tgt / split / "labels" / f"{split}_{i:04d}.png")
    return src, tgt, table_path


def demo_roots(root: str | Path, source: str, target: str) -> dict[str, str]:
    """The run options naming the trees :func:`write_demo` writes under ``root/<source>_to_<target>`` (paths
    only; nothing is written): e.g. ``{"cityscapes_root": ..., "acdc_root": ...}``; for folder -> folder
    ``source_root``, ``target_root`` and ``class_table``."""
    base = Path(root) / f"{source}_to_{target}"
    if (source, target) == ("folder", "folder"):
        return {"source_root": str(base / "source"), "target_root": str(base / "target"),
                "class_table": str(base / "classes.json")}
    if source == "cityscapes" and target in ("acdc", "darkzurich"):
        return {"cityscapes_root": str(base / "cityscapes"), f"{target}_root": str(base / target)}
    raise ValueError(f"expected a generated demo pair among cityscapes -> acdc, cityscapes -> darkzurich, "
                     f"folder -> folder, got {source} -> {target}")


def write_demo(root: str | Path, source: str, target: str, *, seed: int = 0, images: int = 160, val: int = 60,
               size: tuple[int, int] = (128, 64), conditions: tuple[str, ...] = ACDC_CONDITIONS) -> dict[str, str]:
    """The embedded demo of a ``source`` -> ``target`` pair beyond GTA5/SYNTHIA -> Cityscapes, written under
    ``root/<source>_to_<target>``; returns the run's root options (:func:`demo_roots`).

    ``cityscapes`` as the source is the clear-weather rendering; ACDC's conditions and Dark Zurich's night degrade
    it; ``folder`` -> ``folder`` is the K = 5 custom-classes dataset (``class_table`` in the result). ``images``
    per training set (ACDC: split over the conditions), ``val`` labelled target images. Written once: a
    ``.complete`` marker holding the arguments skips the work when it matches.
    """
    out = demo_roots(root, source, target)
    base = Path(root) / f"{source}_to_{target}"
    marker = base / ".complete"
    stamp = f"{source} {target} {seed} {images} {val} {size} {conditions} v1"
    if marker.is_file() and marker.read_text() == stamp:
        return out
    marker.unlink(missing_ok=True)
    if source == "cityscapes":
        write_cityscapes(base / "cityscapes", seed=seed, train=images, val=0, size=size)
    if target == "acdc":
        per = max(1, images // len(conditions))
        write_acdc(base / "acdc", seed=seed, conditions=conditions, train=per, val=max(1, val // len(conditions)),
                   test=0, size=size)
    elif target == "darkzurich":
        write_darkzurich(base / "darkzurich", seed=seed, train=images, val=val, test=0, day=0, size=size)
    if source == "folder":
        write_folder(base, seed=seed, source=images, train=images, val=val, size=size)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(stamp)
    return out


def write_all(root: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Every layout under ``root``: cityscapes/, acdc/, darkzurich/, folder/ (8-bit) and folder16/."""
    root = Path(root)
    out = {"cityscapes": write_cityscapes(root / "cityscapes", seed=seed), "acdc": write_acdc(root / "acdc", seed=seed),
           "darkzurich": write_darkzurich(root / "darkzurich", seed=seed)}
    out["folder"] = write_folder(root / "folder", seed=seed)[0].parent
    out["folder16"] = write_folder(root / "folder16", seed=seed, bits=16)[0].parent
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="write tiny datasets in the ACDC, Dark Zurich, Cityscapes and folder "
                                            "layouts")
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, path in write_all(args.out, seed=args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":  # python -m uda.demo OUT (from examples/)
    sys.exit(main())
