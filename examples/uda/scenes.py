r"""The demo's street scenes: one generator of train-id maps and the renderings of the two domains.

Both domains share one scene generator (sky, buildings, trees, road, sidewalk, terrain, cars, people, poles
and signs laid out like a street, :func:`make_scene`) and differ only in rendering, the synthetic -> real kind
of shift:

* source (:func:`render_source`, "GTA5"): flat rendering, one clean colour per object, sharp edges;
* target (:func:`render_target`, "Cityscapes"): a different camera response (colour cast, lower contrast,
  gamma, per-image exposure), class textures (windows, foliage, asphalt grain, tiles, sky gradient), sensor
  noise and blur;
* adverse conditions (:func:`render_condition`): the target rendering degraded by fog (a depth-dependent
  haze), night (low exposure, blue cast, noise, a few lights), rain (lower contrast, streaks) or snow (white
  ground, flakes).

Everything is a pure function of the random generator handed in. :mod:`demo` writes the scenes in the
datasets' layouts; ``benchmarks/study/shifts.py`` reuses :func:`gaussian_blur`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .datasets import ACDC_CONDITIONS

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
