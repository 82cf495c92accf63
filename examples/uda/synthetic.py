r"""A small deterministic two-domain street-scene dataset, written in the GTA5 (or SYNTHIA) and Cityscapes layouts.

Both domains share one scene generator (sky, buildings, trees, road, sidewalk, terrain, cars, people, poles
and signs laid out like a street) and differ only in rendering, the synthetic -> real kind of shift:

* source ("GTA5"): flat rendering, one clean colour per object, sharp edges;
* target ("Cityscapes"): a different camera response (colour cast, lower contrast, gamma, per-image
  exposure), class textures (windows, foliage, asphalt grain, tiles, sky gradient), sensor noise and blur.

Labels are written as Cityscapes label ids (for the SYNTHIA layout: 16-bit PNGs with SYNTHIA class ids in the
first channel and an instance id in the second), so the real readers (and their id -> train-id mappings) run
unchanged. SYNTHIA has no terrain class: in its layout the source scenes' terrain becomes vegetation. The source
and target images drawn for one seed are the same whichever source layout is written. Everything is a pure
function of the seed.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from .data import ID_TO_TRAIN_ID, SYNTHIA_ID_TO_TRAIN_ID

TRAIN_TO_ID = {v: k for k, v in ID_TO_TRAIN_ID.items()}
TRAIN_TO_SYNTHIA_ID = {v: k for k, v in SYNTHIA_ID_TO_TRAIN_ID.items()}
SOURCE_LAYOUTS = ("gta5", "synthia")
# train ids used by the demo scenes
ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 0, 1, 2, 5, 7, 8, 9, 10, 11, 13
DEMO_CLASSES = (ROAD, SIDEWALK, BUILDING, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)

# flat "rendered" colours of the source domain (RGB)
SOURCE_COLOURS = {
    ROAD: (95, 90, 100), SIDEWALK: (165, 150, 160), BUILDING: (150, 105, 80), POLE: (70, 70, 75),
    SIGN: (225, 195, 40), VEGETATION: (70, 135, 45), TERRAIN: (150, 165, 85), SKY: (115, 170, 235),
    PERSON: (200, 60, 60), CAR: (40, 70, 170),
}


def make_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) uint8 train-id map of a street-like scene (255 = unlabelled)."""
    h, w = height, width
    label = np.full((h, w), SKY, dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    horizon = int(h * rng.uniform(0.38, 0.55))
    # buildings: blocks standing on the horizon
    x = int(rng.integers(-w // 8, 0))
    while x < w:
        bw = int(rng.integers(w // 8, w // 3))
        top = int(rng.integers(int(h * 0.05), max(int(h * 0.06), horizon - h // 8)))
        if rng.random() < 0.85:
            label[top:horizon, max(0, x):max(0, x + bw)] = BUILDING
        x += bw
    # trees: ellipses of foliage above the horizon
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0, w), rng.uniform(horizon * 0.35, horizon)
        rx, ry = rng.uniform(w * 0.05, w * 0.14), rng.uniform(h * 0.08, h * 0.2)
        label[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1] = VEGETATION
    # ground: road in a perspective trapezoid, sidewalks beside it, terrain outside
    ground = yy >= horizon
    label[ground] = TERRAIN
    t = np.clip((yy - horizon) / max(1, h - horizon), 0, 1)
    centre = w * rng.uniform(0.4, 0.6)
    half_road = (0.08 + 0.55 * t) * w
    half_walk = half_road + (0.03 + 0.18 * t) * w
    label[ground & (np.abs(xx - centre) <= half_walk)] = SIDEWALK
    label[ground & (np.abs(xx - centre) <= half_road)] = ROAD
    # cars on the road, nearer ones larger
    for _ in range(int(rng.integers(1, 4))):
        cy = rng.uniform(horizon + 0.15 * (h - horizon), h * 0.97)
        s = (cy - horizon) / max(1, h - horizon)
        cw, ch = (0.12 + 0.3 * s) * w, (0.06 + 0.2 * s) * h
        cx = centre + rng.uniform(-0.5, 0.5) * (0.08 + 0.55 * s) * w
        body = (np.abs(xx - cx) <= cw / 2) & (yy <= cy) & (yy >= cy - ch * 0.6)
        cabin = (np.abs(xx - cx) <= cw / 3) & (yy < cy - ch * 0.6) & (yy >= cy - ch)
        label[body | cabin] = CAR
    # people on the sidewalks
    for _ in range(int(rng.integers(1, 4))):
        side = 1 if rng.random() < 0.5 else -1
        fy = rng.uniform(horizon + 0.1 * (h - horizon), h * 0.98)
        s = (fy - horizon) / max(1, h - horizon)
        fx = centre + side * ((0.08 + 0.55 * s) * w + (0.015 + 0.09 * s) * w)
        ph, pw = (0.15 + 0.35 * s) * h, (0.02 + 0.05 * s) * w
        body = (np.abs(xx - fx) <= pw / 2) & (yy <= fy) & (yy >= fy - ph * 0.8)
        head = ((xx - fx) / (pw * 0.6)) ** 2 + ((yy - (fy - ph * 0.88)) / (ph * 0.1)) ** 2 <= 1
        label[body | head] = PERSON
    # poles with a sign on top
    for _ in range(int(rng.integers(1, 3))):
        side = 1 if rng.random() < 0.5 else -1
        by = rng.uniform(horizon + 0.2 * (h - horizon), h * 0.95)
        s = (by - horizon) / max(1, h - horizon)
        px = centre + side * ((0.1 + 0.6 * s) * w + 0.02 * w)
        ph = (0.35 + 0.4 * s) * h
        pw = max(1.2, (0.006 + 0.012 * s) * w)
        label[(np.abs(xx - px) <= pw / 2) & (yy <= by) & (yy >= by - ph)] = POLE
        sz = (0.03 + 0.05 * s) * w
        sy = by - ph
        label[(np.abs(xx - px) <= sz / 2) & (np.abs(yy - sy) <= sz / 2)] = SIGN
    return label


def render_source(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat rendering: one colour per class and image (small jitter), hard edges, tiny noise."""
    img = np.zeros(label.shape + (3,), dtype=np.float32)
    for cls, colour in SOURCE_COLOURS.items():
        jitter = rng.normal(0, 8, size=3)
        img[label == cls] = np.asarray(colour, dtype=np.float32) + jitter
    img += rng.normal(0, 2, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W, C) float image, edges replicated (radius 2·sigma, at least 1)."""
    radius = max(1, round(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    tmp = sum(k[i] * pad[:, i:i + img.shape[1]] for i in range(2 * radius + 1))
    return sum(k[i] * tmp[i:i + img.shape[0]] for i in range(2 * radius + 1))


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Value noise in [-1, 1] with blobs of about ``cell`` pixels."""
    h, w = shape
    coarse = rng.uniform(-1, 1, size=(h // cell + 2, w // cell + 2)).astype(np.float32)
    big = np.asarray(Image.fromarray(coarse).resize(((w // cell + 2) * cell, (h // cell + 2) * cell), Image.BILINEAR))
    return big[:h, :w]


def render_target(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """"Real" rendering: textures, a different camera response, exposure, sensor noise and blur."""
    h, w = label.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), dtype=np.float32)
    for cls, colour in SOURCE_COLOURS.items():
        img[label == cls] = np.asarray(colour, dtype=np.float32) + rng.normal(0, 12, size=3)
    fine = rng.normal(0, 1, size=(h, w)).astype(np.float32)
    blobs = _smooth_noise(rng, (h, w), 4)
    tex = np.zeros((h, w), dtype=np.float32)
    tex += np.where(label == BUILDING, -45.0 * (((yy % 6) < 3) & ((xx % 7) < 4)) + 10 * blobs, 0)  # windows
    tex += np.where(label == VEGETATION, 40.0 * blobs + 15 * fine, 0)  # foliage
    tex += np.where(label == ROAD, 14.0 * fine + 8 * blobs, 0)  # asphalt grain
    tex += np.where(label == SIDEWALK, -25.0 * (((xx + 2 * yy) % 9) < 1), 0)  # tiles
    tex += np.where(label == TERRAIN, 30.0 * blobs + 10 * fine, 0)
    tex += np.where(label == SKY, 50.0 * (yy / h) - 20, 0)  # brighter near the horizon
    tex += np.where(label == CAR, 35.0 * (yy % 5 < 1), 0)
    img += tex[..., None]
    # camera response: colour cast and channel mixing, lower contrast, gamma, exposure
    mix = np.array([[0.80, 0.15, 0.05], [0.10, 0.75, 0.15], [0.05, 0.25, 0.70]], dtype=np.float32)
    img = img @ mix.T
    img = 128 + 0.75 * (img - 128) + np.array([22, 6, -18], dtype=np.float32)
    img = 255 * (np.clip(img, 0, 255) / 255) ** rng.uniform(0.8, 1.2)
    img = img * rng.uniform(0.8, 1.15)
    img = gaussian_blur(img, sigma=0.9)
    img += rng.normal(0, 7, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids (uint8); 255 and unknown ids -> 0 ("unlabeled", ignored by the reader)."""
    lut = np.zeros(256, dtype=np.uint8)
    for train_id, label_id in TRAIN_TO_ID.items():
        lut[train_id] = label_id
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
    for train_id, synthia_id in TRAIN_TO_SYNTHIA_ID.items():
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
