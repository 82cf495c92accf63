r"""Tiny generated datasets in the ACDC, Dark Zurich, Cityscapes and folder layouts (tests and demo).

The scenes and renderings are the embedded demo's (:mod:`synthetic`: one street-scene generator, a flat
"source" and a textured "target" rendering); each adverse condition adds its own degradation on top of the
target rendering (fog: a depth-dependent haze; night: low exposure, blue cast, noise, a few lights; rain:
lower contrast and streaks; snow: white ground and flakes). Everything is a pure function of the seed.

Labels are written as the datasets release them:

* Cityscapes: ``*_gtFine_labelIds.png`` (label ids);
* ACDC and Dark Zurich: ``*_gt_labelTrainIds.png`` (train ids, 255 ignore) *and* ``*_gt_labelIds.png``
  (label ids), both present as in the releases, so that a reader that takes the wrong file or maps train
  ids a second time gets a different answer;
* folder: raw ids of a custom class table (K = 5 by default, 8- or 16-bit PNGs), with the table as
  ``classes.json``.

Run ``python examples/uda/layout_demo.py OUT`` to write all of them under ``OUT``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

if __package__ in (None, ""):  # run as a script: make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "uda"

from .classes import ClassTable  # noqa: E402
from .layouts import ACDC_CONDITIONS  # noqa: E402
from .synthetic import (  # noqa: E402
    BUILDING, CAR, PERSON, POLE, ROAD, SIDEWALK, SIGN, SKY, TERRAIN, VEGETATION, gaussian_blur, make_scene,
    render_source, render_target, to_label_ids, write_cityscapes_layout,
)

EGO_VEHICLE_ID = 1  # Cityscapes label id of the ego vehicle (ignored): the bottom rows of ACDC-like frames


def _scene(rng: np.random.Generator, size: tuple[int, int], *, ego: bool = False) -> np.ndarray:
    label = make_scene(rng, size[1], size[0])
    if ego:  # an ego-vehicle strip: ignored in the train ids
        label[-max(1, size[1] // 16):] = 255
    return label


def render_condition(label: np.ndarray, condition: str, rng: np.random.Generator) -> np.ndarray:
    """A target rendering of ``label`` degraded by ``condition`` (fog, night, rain, snow; ``clear``: none)."""
    img = render_target(np.where(label == 255, ROAD, label).astype(np.uint8), rng).astype(np.float32)
    h, w = label.shape
    yy = np.mgrid[0:h, 0:w][0].astype(np.float32) / h
    if condition == "fog":
        haze = np.clip(0.65 - 0.5 * yy, 0.15, 0.65)[..., None]  # far (top) more than near (bottom)
        img = img * (1 - haze) + 205 * haze
        img = gaussian_blur(img, 1.2)
    elif condition == "night":
        img = 255 * (np.clip(img, 0, 255) / 255) ** 1.8 * 0.35
        img = img * np.array([0.8, 0.9, 1.25], dtype=np.float32)
        for _ in range(int(rng.integers(2, 5))):  # street lights
            cy, cx, r = rng.uniform(0, h * 0.5), rng.uniform(0, w), rng.uniform(1.5, 3)
            yx = np.mgrid[0:h, 0:w].astype(np.float32)
            glow = np.exp(-(((yx[0] - cy) ** 2 + (yx[1] - cx) ** 2) / (2 * r * r)))
            img += 160 * glow[..., None] * np.array([1.0, 0.85, 0.5], dtype=np.float32)
        img += rng.normal(0, 9, size=img.shape)
    elif condition == "rain":
        img = 110 + 0.7 * (img - 110)
        streaks = np.zeros((h, w), dtype=np.float32)
        for _ in range(int(w * h / 60)):
            x, y, n = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(3, 7))
            streaks[y:y + n, x] = 1
        img = img * 0.85 + 60 * streaks[..., None]
        img = gaussian_blur(img, 0.8)
    elif condition == "snow":
        ground = np.isin(label, (ROAD, SIDEWALK, TERRAIN))[..., None]
        img = np.where(ground, 0.45 * img + 0.55 * 235, img)
        flakes = rng.random((h, w)) < 0.03
        img[flakes] = 250
        img = 0.9 * img + 25
    elif condition != "clear":
        raise ValueError(f"expected condition in {ACDC_CONDITIONS + ('clear',)}, got {condition!r}")
    return np.clip(img, 0, 255).astype(np.uint8)


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


if __name__ == "__main__":
    sys.exit(main())
