r"""Two shifts built from real data that ships inside package wheels, for issue 35 (``python -m
benchmarks.study.real_shifts digits DIR`` writes one). Nothing in this project was chosen on them: they were
written for the round-score transfer study (:mod:`benchmarks.study.transfer_scores`) and its settings were fixed
before any run on them.

* ``digits`` — **printed → handwritten**. Classes: ten digits (Cityscapes train ids 1-10, which name nothing
  here) on a background (train id 0). Source: digits typeset in the DejaVu Sans fonts that matplotlib ships
  (regular, bold, oblique, bold oblique: real type designs), dark ink on light paper with a little noise.
  Target: scikit-learn's handwritten digits (``load_digits``: 1797 scans of 8×8 bitmaps by 13 writers, read
  from the wheel), scaled to the same glyph sizes, ink on windows of a scanned page (scikit-image's
  ``page.png``: printed text, uneven paper), under lens blur and sensor noise. Target train images draw digits
  0-1199 of the set, target val images 1200-1796.
* ``faces`` — **grey studio crops → colour photographs of other people**. scikit-image's ``lfw_subset.npy`` holds
  100 face crops (Labeled Faces in the Wild) and 100 non-face crops of natural images, 25×25 each. Scenes are
  grids of scaled crops: face (train id 11, person), non-face (train id 2, building), the background between
  them (train id 0). Source: faces 0-49 and non-faces 100-149, grey, on a grey gravel texture. Target: the
  other people and patches (train: 50-84 and 150-184; val: 85-99 and 185-199), tinted, under another gamma and
  contrast, on windows of colour photographs (``coffee``, ``chelsea``, ``rocket``, ``motorcycle_left``), with blur
  and noise.

Both are written in the GTA5 / Cityscapes layouts (Cityscapes label ids) at 128×64, 160 source, 160 target train,
60 target val images (the other study shifts' sizes), a pure function of the seed; nothing is downloaded (the
digits come from the installed scikit-learn, the fonts from the installed matplotlib, the photographs from the
installed scikit-image).
"""

from __future__ import annotations

import argparse
import sys
from functools import cache
from pathlib import Path

import numpy as np
from uda.scenes import gaussian_blur
from PIL import Image, ImageDraw, ImageFont

from .shifts import _image, _window, write_layouts

REAL_SHIFTS = ("digits", "faces")
BACKGROUND, FACE, NON_FACE = 0, 11, 2  # Cityscapes train ids: road, person, building (names only)
DIGIT_IDS = tuple(range(1, 11))  # digit d -> train id d + 1
SOURCE_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf")
HANDWRITTEN_SPLIT = 1200  # target train draws handwritten digits [0, 1200), target val [1200, 1797)
FACE_SPLITS = {"source": (range(0, 50), range(100, 150)), "train": (range(50, 85), range(150, 185)),
               "val": (range(85, 100), range(185, 200))}
PHOTOS = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png")


@cache
def handwritten_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled handwritten digits: images ``(1797, 8, 8)`` in [0, 1] and targets ``(1797,)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - the study extra installs it
        raise ImportError("the digits shift needs scikit-learn (pip install -e '.[study]'): its bundled "
                          "handwritten digits are the target domain") from error
    digits = load_digits()
    return np.asarray(digits.images, np.float32) / 16.0, np.asarray(digits.target, np.int64)


@cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise FileNotFoundError(f"expected the font {name!r} inside matplotlib's wheel at {str(path)!r}")
    return ImageFont.truetype(str(path), size)


def _typeset(digit: int, size: int, font: str) -> np.ndarray:
    """The ink coverage ``(size, size)`` in [0, 1] of one typeset digit, centred."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    face = _font(font, int(size * 1.25))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=face)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), str(digit), fill=255,
              font=face)
    return np.asarray(canvas, np.float32) / 255.0


def _handwritten(index: int, size: int) -> np.ndarray:
    images, _ = handwritten_digits()
    small = Image.fromarray((images[index] * 255).astype(np.uint8))
    return np.asarray(small.resize((size, size), Image.BILINEAR), np.float32) / 255.0


def _slots(rng: np.random.Generator, height: int, width: int, cell: int, count: int) -> list[tuple[int, int]]:
    """``count`` distinct cells of a grid of ``cell``-pixel squares, jittered inside the image."""
    rows, cols = max(1, height // cell), max(1, width // cell)
    picked = rng.choice(rows * cols, size=min(count, rows * cols), replace=False)
    out = []
    for p in picked:
        r, c = divmod(int(p), cols)
        top = r * cell + int(rng.integers(0, max(1, height // rows - cell + 1)))
        left = c * cell + int(rng.integers(0, max(1, width // cols - cell + 1)))
        out.append((min(top, height - cell), min(left, width - cell)))
    return out


def _digit_scene(rng: np.random.Generator, size: tuple[int, int], target: bool, split: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    w, h = size
    cell = int(rng.integers(20, 29))
    ink = np.zeros((h, w), np.float32)
    label = np.full((h, w), BACKGROUND, np.uint8)
    _, classes = handwritten_digits() if target else (None, None)
    for top, left in _slots(rng, h, w, cell, int(rng.integers(3, 7))):
        if target:
            lo, hi = (0, HANDWRITTEN_SPLIT) if split == "train" else (HANDWRITTEN_SPLIT, len(classes))
            index = int(rng.integers(lo, hi))
            glyph, digit = _handwritten(index, cell), int(classes[index])
        else:
            digit = int(rng.integers(0, 10))
            glyph = _typeset(digit, cell, SOURCE_FONTS[int(rng.integers(0, len(SOURCE_FONTS)))])
        region = (slice(top, top + cell), slice(left, left + cell))
        ink[region] = np.maximum(ink[region], glyph)
        label[region][glyph > 0.5] = DIGIT_IDS[digit]
    if target:
        paper = _window(rng, _image("page.png"), h, w, float(rng.uniform(0.8, 1.6))).mean(-1, keepdims=True)
        paper = paper * rng.uniform(0.85, 1.05, size=3) + rng.uniform(-10, 10, size=3)
        colour = rng.uniform(20, 90, size=3)
    else:
        paper = np.full((h, w, 3), rng.uniform(200, 245), np.float32) + rng.uniform(-8, 8, size=3)
        colour = np.full(3, rng.uniform(10, 50), np.float32)
    image = paper * (1 - ink[..., None]) + colour * ink[..., None]
    if target:
        image = gaussian_blur(image, float(rng.uniform(0.6, 1.2)))
    image = image + rng.normal(0, 6 if target else 2, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


@cache
def _faces() -> np.ndarray:
    from .shifts import skimage_data_dir
    path = skimage_data_dir() / "lfw_subset.npy"
    if not path.is_file():
        raise FileNotFoundError(f"expected lfw_subset.npy inside the scikit-image wheel at {str(path)!r}")
    return np.load(path).astype(np.float32)  # (200, 25, 25) in [0, 1]: faces 0-99, non-faces 100-199


def _face_scene(rng: np.random.Generator, size: tuple[int, int], split: str) -> tuple[np.ndarray, np.ndarray]:
    w, h = size
    crops = _faces()
    faces, others = FACE_SPLITS[split]
    target = split != "source"
    cell = int(rng.integers(22, 31))
    if target:
        image = _window(rng, _image(PHOTOS[int(rng.integers(0, len(PHOTOS)))]), h, w, float(rng.uniform(1, 3)))
    else:
        image = np.repeat(_window(rng, _image("gravel.png"), h, w, 1.0).mean(-1, keepdims=True), 3, axis=-1)
    label = np.full((h, w), BACKGROUND, np.uint8)
    tint = rng.uniform(0.7, 1.3, size=3) if target else np.ones(3)
    gamma = float(rng.uniform(0.6, 1.6)) if target else 1.0
    for top, left in _slots(rng, h, w, cell, int(rng.integers(3, 7))):
        is_face = bool(rng.random() < 0.5)
        index = int(rng.choice(faces if is_face else others))
        crop = Image.fromarray((crops[index] * 255).astype(np.uint8)).resize((cell, cell), Image.BILINEAR)
        crop = np.asarray(crop, np.float32)[..., None] / 255.0
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        image[top:top + cell, left:left + cell] = 255 * np.clip(crop ** gamma * tint, 0, 1)
        label[top:top + cell, left:left + cell] = FACE if is_face else NON_FACE
    if target:
        image = gaussian_blur(image, float(rng.uniform(0.5, 1.0)))
    image = image + rng.normal(0, 5 if target else 2, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label


def sample(shift: str, rng: np.random.Generator, size: tuple[int, int], split: str
           ) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image (H, W, 3) uint8, train ids (H, W))`` of ``shift``'s ``split`` ("source", "train", "val")."""
    if shift == "digits":
        return _digit_scene(rng, size, split != "source", split)
    return _face_scene(rng, size, split)


def write_real_shift(shift: str, root: str | Path, *, seed: int = 0, source_images: int = 160,
                     target_train: int = 160, target_val: int = 60, size: tuple[int, int] = (128, 64)
                     ) -> tuple[Path, Path]:
    """Write ``shift`` ("digits" or "faces") under ``root`` (``root/gta5``, ``root/cityscapes``), as
    :func:`benchmarks.study.shifts.write_shift` does; returns ``(gta5_root, cityscapes_root)``. Deterministic in
    the arguments; a complete copy for the same arguments is not written again."""
    return write_layouts(root, shift, REAL_SHIFTS, seed, 3535, (source_images, target_train, target_val), size, 32,
                         lambda rng: sample(shift, rng, size, "source"), lambda rng, split: sample(shift, rng, size, split))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shift", choices=REAL_SHIFTS)
    p.add_argument("root")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    gta, cs = write_real_shift(a.shift, a.root, seed=a.seed)
    print(f"--gta5-root {gta} --cityscapes-root {cs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
