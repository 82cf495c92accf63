r"""Three more domain shifts built from real photographs that scikit-image ships in its wheel (study tooling:
``python -m benchmarks.study.shifts photo DIR`` writes one).

The embedded demo (``examples/uda/demo.py``) was designed together with the pipeline; these shifts test whether
adaptation holds beyond it. All are written in the GTA5 / Cityscapes layouts (Cityscapes label ids), so
``examples/train_gta2cs.py --gta5-root ... --cityscapes-root ... --arch tiny`` trains on them unchanged.

Everything comes from files inside the installed ``skimage/data`` folder (read with Pillow straight from the
package directory, so nothing is ever fetched) and from numpy, and is a pure function of the seed:

* real textures: ``gravel.png`` (asphalt), ``brick.png`` (façades), ``grass.png`` (foliage, terrain),
  ``moon.png`` (concrete walls), ``text.png`` (sign lettering);
* real photo crops: ``rocket.jpg`` (a dusk sky), ``astronaut.png`` (a person: clothing and skin),
  ``motorcycle_left.png`` (a vehicle: paint, chrome, tyres);
* real photographs used as clutter: ``coffee.png``, ``chelsea.png``, ``astronaut.png``, ``rocket.jpg``,
  ``motorcycle_left.png``, ``hubble_deep_field.jpg``, ``camera.png``, ``coins.png``.

The first two shifts share one layout generator, :func:`make_layout` (a one-point-perspective street canyon: façades
converging on a vanishing point, road, sidewalks, low walls, terrain verges, trees, cars, pedestrians, poles
with signs; 11 of the 19 classes), which differs from the demo's generator. They differ in the kind of shift:

* ``photo`` — an **appearance** shift (synthetic → real). Source: a cartoon rendering (one flat, posterised
  colour per object, dark outlines). Target: the real photo textures above, under another illumination (warm
  low sun: colour temperature, exposure, gamma, a cast shadow across the street, vignetting), lens blur and
  sensor noise. The layout distribution is the same in both domains.
* ``clutter`` — a **content and geometry** shift with no change of rendering. Both domains use the same photo
  textures in daylight. Target images are (1) taken by another camera: zoomed in 1.4× (a random window of the
  layout, so objects are larger and fewer) and tilted (the horizon drawn lower in the layout), (2) blended with a real photograph (α 0.25–0.45, like a reflection in a
  windscreen) and (3) partly occluded by 1–2 pasted photo patches that carry no class (label id 0, ignored
  by training and evaluation).

A third shift, ``shape``, has no street at all: its classes differ by **shape** only (issue 20).
:func:`make_shape_layout` draws filled boxes and discs, then thin structures: rings, near-vertical strokes and
diagonal hatching (2.5-4 px wide: at most one cell of the tiny CNN's stride-4 feature grid) on a ground; the six
classes carry the Cityscapes train ids of road (ground), car (box), person (disc), traffic light (ring), pole
(stroke) and fence (hatch), which name nothing but the ids here. Every image draws all of its shapes in one "ink"
(a window of a photograph, its brightness moved away from the ground's) over a ground (another window), so colour
and texture say nothing about the class. Source: gray textures (``brick``, ``gravel``, ``grass``, ``moon``,
``camera``, ``coins``), tinted, at a clear contrast (70-120 grey levels). Target: colour photographs
(``coffee``, ``chelsea``, ``astronaut``, ``rocket``, ``motorcycle_left``, ``hubble_deep_field``, ``retina``,
``ihc``) at a lower contrast (55-100), blended with another photograph (α 0.2-0.4; also ``horse``, ``color``,
``cell``, ``microaneurysms``, ``logo``), lens blur and sensor noise.

Sizes (W, H) and counts default to the demo's: 160 source images, 160 target train and 60 target val images,
128×64 pixels, so ``--arch tiny`` trains in a minute on one CPU thread.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
from uda.demo import write_cityscapes_layout, write_gta5_layout
from uda.scenes import gaussian_blur
from PIL import Image

from protocl import IGNORE_INDEX

ROAD, SIDEWALK, BUILDING, WALL, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR = 0, 1, 2, 3, 5, 7, 8, 9, 10, 11, 13
SHIFT_CLASSES = (ROAD, SIDEWALK, BUILDING, WALL, POLE, SIGN, VEGETATION, TERRAIN, SKY, PERSON, CAR)
UNLABELLED = IGNORE_INDEX  # train id of pixels without a class (written as label id 0)
STREET_SHIFTS = ("photo", "clutter")  # the street-canyon layouts of make_layout
SHIFTS = (*STREET_SHIFTS, "shape")

# flat colours of the cartoon rendering (RGB), roughly the mean colour of each class's photo texture
CARTOON = {
    ROAD: (92, 92, 98), SIDEWALK: (170, 160, 150), BUILDING: (160, 90, 70), WALL: (150, 150, 140),
    POLE: (60, 60, 66), SIGN: (230, 190, 30), VEGETATION: (55, 120, 40), TERRAIN: (140, 160, 80),
    SKY: (90, 140, 220), PERSON: (210, 120, 80), CAR: (170, 40, 40),
}
# gray texture files and the colour each is tinted to (daylight), with the zoom of the random window
GRAY_TEXTURES = {
    ROAD: ("gravel.png", (96, 94, 100), 3.0), SIDEWALK: ("gravel.png", (175, 165, 155), 1.5),
    BUILDING: ("brick.png", (165, 95, 75), 2.0), WALL: ("moon.png", (150, 150, 140), 2.0),
    VEGETATION: ("grass.png", (60, 125, 45), 2.0), TERRAIN: ("grass.png", (145, 160, 85), 4.0),
    SIGN: ("text.png", (235, 195, 35), 1.0), POLE: ("camera.png", (65, 65, 70), 4.0),
}
# colour photo crops (file, (left, top, right, bottom) in the file's pixels) used as textures
PHOTO_CROPS = {
    SKY: ("rocket.jpg", (212, 0, 296, 250)),
    PERSON: ("astronaut.png", (120, 90, 420, 512)),
    CAR: ("motorcycle_left.png", (120, 140, 660, 440)),
}
CLUTTER_PHOTOS = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
                  "hubble_deep_field.jpg", "camera.png", "coins.png")


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image (its images ship in the wheel)."""
    try:
        import skimage
    except ImportError as error:  # pragma: no cover - the examples extra installs it
        raise ImportError("the shifts need scikit-image (pip install -e '.[examples]'): its bundled images "
                          "are the real photographs they are built from") from error
    return Path(skimage.__file__).resolve().parent / "data"


@cache
def _image(name: str) -> np.ndarray:
    """A bundled image as float32 (H, W, 3) RGB in [0, 255]; read from the package folder, never fetched."""
    path = skimage_data_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"expected {name!r} inside the scikit-image wheel at {str(path)!r}")
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def _window(rng: np.random.Generator, image: np.ndarray, h: int, w: int, zoom: float) -> np.ndarray:
    """A random window of ``image`` covering (h·zoom', w·zoom') pixels, resized to (h, w); zoom' ≈ zoom."""
    ih, iw = image.shape[:2]
    z = zoom * rng.uniform(0.8, 1.25)
    ch, cw = min(ih, max(4, round(h * z))), min(iw, max(4, round(w * z)))
    top, left = int(rng.integers(0, ih - ch + 1)), int(rng.integers(0, iw - cw + 1))
    crop = image[top:top + ch, left:left + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return _resize(crop, w, h)


def _resize(image: np.ndarray, w: int, h: int) -> np.ndarray:
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize((w, h), Image.BILINEAR))
                for c in range(image.shape[2])]
    return np.stack(channels, axis=-1)


def _texture(cls: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A full (h, w, 3) layer of class ``cls``'s real texture (daylight colours)."""
    if cls in PHOTO_CROPS:
        name, (left, t, r, b) = PHOTO_CROPS[cls]
        return _window(rng, _image(name)[t:b, left:r], h, w, 1.0 if cls != SKY else 0.6)
    name, colour, zoom = GRAY_TEXTURES[cls]
    gray = _window(rng, _image(name), h, w, zoom)[..., :1]
    return np.asarray(colour, np.float32) * np.clip(gray / max(1.0, float(gray.mean())), 0.2, 2.5)


# ---------------------------------------------------------------------------------------------------- layout
def make_layout(rng: np.random.Generator, height: int, width: int, *,
                horizon: tuple[float, float] = (0.34, 0.46)) -> np.ndarray:
    """A (H, W) uint8 train-id map of a one-point-perspective street canyon; ``horizon`` is the range of the
    horizon's height as a fraction of H."""
    h, w = height, width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vx = w * rng.uniform(0.35, 0.65)
    vy = h * rng.uniform(*horizon)
    label = np.full((h, w), SKY, np.uint8)
    below = np.clip(yy - vy, 0, None)  # depth cue: 0 at the horizon, grows towards the camera
    dx = (xx - vx)
    road = rng.uniform(0.9, 1.5)  # half-width of the road per row below the horizon
    walk = road + rng.uniform(0.35, 0.7)
    # façades above the horizon on each side (an open side shows sky); the roof line rises outwards
    for side in (-1, 1):
        if rng.random() < 0.85:
            roof = vy - (2 + rng.uniform(0.3, 0.8) * np.abs(dx)) * rng.uniform(0.8, 1.2)
            label[(side * dx > rng.uniform(0.5, 3.0)) & (yy >= roof) & (yy < vy)] = BUILDING
    # trees in front of façades or in the open sides
    for _ in range(int(rng.integers(1, 4))):
        side = -1 if rng.random() < 0.5 else 1
        tx = vx + side * w * rng.uniform(0.12, 0.45)
        ty = vy - h * rng.uniform(0.0, 0.15)
        rx, ry = w * rng.uniform(0.05, 0.11), h * rng.uniform(0.1, 0.22)
        label[((xx - tx) / rx) ** 2 + ((yy - ty) / ry) ** 2 <= 1] = VEGETATION
    # ground: terrain everywhere below the horizon, then sidewalks and the road
    ground = yy >= vy
    label[ground] = TERRAIN
    sidewalk = ground & (np.abs(dx) <= walk * below + 1)
    label[sidewalk] = SIDEWALK
    label[ground & (np.abs(dx) <= road * below + 0.5)] = ROAD
    # low walls along the outer edge of the sidewalks (a band of rows just above that edge)
    for side in (-1, 1):
        if rng.random() < 0.5:
            band = ground & (side * dx > walk * below + 1) & (side * dx <= (walk + 0.35) * below + 2)
            label[band & (yy >= vy + 1)] = WALL
    # cars on the road, nearer ones larger
    for _ in range(int(rng.integers(1, 4))):
        cy = vy + (h - vy) * rng.uniform(0.2, 0.95)
        depth = (cy - vy)
        cw, ch = 0.7 * road * depth + 3, 0.4 * road * depth + 2
        cx = vx + rng.uniform(-0.6, 0.6) * road * depth
        body = (np.abs(xx - cx) <= cw / 2) & (yy <= cy) & (yy >= cy - 0.6 * ch)
        cabin = (np.abs(xx - cx) <= cw / 3) & (yy < cy - 0.6 * ch) & (yy >= cy - ch)
        label[body | cabin] = CAR
    # pedestrians on the sidewalks
    for _ in range(int(rng.integers(1, 4))):
        side = -1 if rng.random() < 0.5 else 1
        fy = vy + (h - vy) * rng.uniform(0.15, 0.95)
        depth = (fy - vy)
        fx = vx + side * (road + rng.uniform(0.1, 0.9) * (walk - road)) * depth
        ph, pw = 0.7 * depth + 4, 0.14 * depth + 1.2
        body = (np.abs(xx - fx) <= pw / 2) & (yy <= fy) & (yy >= fy - 0.82 * ph)
        head = ((xx - fx) / (0.5 * pw + 0.3)) ** 2 + ((yy - (fy - 0.9 * ph)) / (0.09 * ph + 0.5)) ** 2 <= 1
        label[body | head] = PERSON
    # poles with a sign, at the outer edge of a sidewalk
    for _ in range(int(rng.integers(1, 3))):
        side = -1 if rng.random() < 0.5 else 1
        by = vy + (h - vy) * rng.uniform(0.25, 0.9)
        depth = (by - vy)
        px = vx + side * (walk - 0.1) * depth
        ph, pw = 0.9 * depth + 8, max(1.2, 0.06 * depth)
        label[(np.abs(xx - px) <= pw / 2) & (yy <= by) & (yy >= by - ph)] = POLE
        s = max(2.5, 0.15 * depth + 1.5)
        label[(np.abs(xx - px) <= s / 2) & (np.abs(yy - (by - ph)) <= s / 2)] = SIGN
    return label


def zoom_layout(label: np.ndarray, rng: np.random.Generator, zoom: float) -> np.ndarray:
    """A longer focal length: a random window of 1/``zoom`` of the layout, nearest-upsampled to its size."""
    h, w = label.shape
    ch, cw = round(h / zoom), round(w / zoom)
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return np.asarray(Image.fromarray(label[top:top + ch, left:left + cw]).resize((w, h), Image.NEAREST))


# ---------------------------------------------------------------------------------------------------- rendering
def render_cartoon(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Source of ``photo``: one flat colour per class and image, posterised, dark outlines."""
    img = np.zeros(label.shape + (3,), np.float32)
    for cls, colour in CARTOON.items():
        img[label == cls] = np.asarray(colour, np.float32) + rng.normal(0, 10, size=3)
    img = np.round(img / 24) * 24  # posterise
    edge = np.zeros(label.shape, bool)
    edge[1:] |= label[1:] != label[:-1]
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    img[edge] *= 0.35
    img += rng.normal(0, 1.5, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_photo(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Real textures in daylight: each class's pixels from its own texture layer (float32, unclipped)."""
    h, w = label.shape
    img = np.zeros((h, w, 3), np.float32)
    for cls in SHIFT_CLASSES:
        mask = label == cls
        if mask.any():
            layer = _texture(cls, rng, h, w)
            if cls == CAR:  # per-image paint colour
                layer = layer * rng.uniform(0.6, 1.3, size=3).astype(np.float32)
            img[mask] = layer[mask]
    return img


def render_photo_target(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Target of ``photo``: photo textures under a warm low sun, a cast shadow, vignetting, blur and noise."""
    h, w = label.shape
    img = render_photo(label, rng)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # a cast shadow: one side of a random line through the image is darker and bluer
    angle = rng.uniform(0, np.pi)
    offset = rng.uniform(-0.3, 0.3) * w
    shadow = (np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2)) > offset
    img[shadow] *= np.asarray([0.65, 0.7, 0.85], np.float32) * rng.uniform(0.85, 1.1)
    # warm low sun: colour temperature, exposure, gamma
    img *= np.asarray([1.2, 1.0, 0.75], np.float32) * rng.uniform(0.9, 1.25)
    img = 255 * (np.clip(img, 0, 255) / 255) ** rng.uniform(0.9, 1.2)
    # vignetting, lens blur, sensor noise
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    img *= (1 - 0.35 * r2 / 2)[..., None]
    img = gaussian_blur(img, sigma=rng.uniform(0.6, 1.0))
    img += rng.normal(0, 6, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_clutter_target(label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Target of ``clutter``: daylight photo textures blended with a real photograph, plus photo occluders.

    Returns ``(image, label)``; occluded pixels get the unlabelled train id (255).
    """
    h, w = label.shape
    img = render_photo(label, rng)
    label = label.copy()
    photo = _window(rng, _image(CLUTTER_PHOTOS[int(rng.integers(len(CLUTTER_PHOTOS)))]), h, w, 2.5)
    alpha = rng.uniform(0.25, 0.45)
    img = (1 - alpha) * img + alpha * photo
    for _ in range(int(rng.integers(1, 3))):
        ph, pw = int(h * rng.uniform(0.15, 0.3)), int(w * rng.uniform(0.1, 0.22))
        top, left = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        patch = _window(rng, _image(CLUTTER_PHOTOS[int(rng.integers(len(CLUTTER_PHOTOS)))]), ph, pw, 1.5)
        img[top:top + ph, left:left + pw] = patch
        label[top:top + ph, left:left + pw] = UNLABELLED
    img += rng.normal(0, 2, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


# ---------------------------------------------------------------------------------------------------- shape
# ``shape``: classes defined by their SHAPE alone (train ids of Cityscapes, named here by the shape they carry)
GROUND, BOX, DISC, RING, STROKE, HATCH = 0, 13, 11, 6, 5, 4
SHAPE_CLASSES = (GROUND, BOX, DISC, RING, STROKE, HATCH)
SHAPE_NAMES = {GROUND: "ground (background)", BOX: "box (filled rectangle)", DISC: "disc (filled)",
               RING: "ring (3-4 px outline)", STROKE: "stroke (2.5-4 px wide, near vertical)",
               HATCH: "hatch (2-4 parallel 2.5-4 px diagonals)"}
# the thin ones (ring, stroke, hatch) are at most one cell of the tiny CNN's stride-4 feature grid wide. All
# shapes of an image share one "ink" (a photograph's window) over a ground (another one): texture and colour carry
# no class. Source pool: gray textures, tinted; target pool: colour photographs, blended with another photograph.
SHAPE_SOURCE_POOL = ("brick.png", "gravel.png", "grass.png", "moon.png", "camera.png", "coins.png")
SHAPE_TARGET_POOL = ("coffee.png", "chelsea.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png",
                     "hubble_deep_field.jpg", "retina.jpg", "ihc.png")
SHAPE_BLEND = ("horse.png", "color.png", "cell.png", "microaneurysms.png", "logo.png")  # + the target pool


def _segment_distance(xx: np.ndarray, yy: np.ndarray, a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel centre to the segment a-b."""
    (ax, ay), (bx, by) = a, b
    dx, dy = bx - ax, by - ay
    t = np.clip(((xx - ax) * dx + (yy - ay) * dy) / max(1e-6, dx * dx + dy * dy), 0, 1)
    return np.hypot(xx - (ax + t * dx), yy - (ay + t * dy))


def make_shape_layout(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (H, W) uint8 train-id map of shapes on a ground: filled boxes and discs, then the thin ones (rings,
    near-vertical strokes, diagonal hatching) drawn over them; sizes (given for H = 64) scale with H."""
    h, w = height, width
    s = h / 64  # sizes are given for H = 64
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    label = np.full((h, w), GROUND, np.uint8)
    for _ in range(int(rng.integers(1, 4))):  # boxes
        bw, bh = rng.uniform(10, 30) * s, rng.uniform(8, 20) * s
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        label[(np.abs(xx - cx) <= bw / 2) & (np.abs(yy - cy) <= bh / 2)] = BOX
    for _ in range(int(rng.integers(2, 5))):  # discs
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(4.5, 10) * s
        label[np.hypot(xx - cx, yy - cy) <= r] = DISC
    for _ in range(int(rng.integers(1, 4))):  # rings
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(6, 13) * s
        label[np.abs(np.hypot(xx - cx, yy - cy) - r) <= rng.uniform(1.4, 2.0) * s] = RING
    for _ in range(int(rng.integers(3, 7))):  # near-vertical strokes
        x0, y0 = rng.uniform(0, w), rng.uniform(0, h)
        length, tilt = rng.uniform(20, 50) * s, rng.uniform(-0.17, 0.17)
        end = (x0 + length * np.sin(tilt), y0 + length * np.cos(tilt))
        label[_segment_distance(xx, yy, (x0, y0), end) <= rng.uniform(1.25, 2.0) * s] = STROKE
    for _ in range(int(rng.integers(1, 4))):  # hatching: parallel diagonals
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        angle = rng.choice([-1, 1]) * rng.uniform(np.pi / 6, np.pi / 3)  # 30-60 degrees from horizontal
        length, gap = rng.uniform(12, 26) * s, rng.uniform(6, 9) * s
        ux, uy, nx, ny = np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle)
        half = rng.uniform(1.25, 2.0) * s
        for i in range(int(rng.integers(2, 5))):
            ox, oy = cx + i * gap * nx, cy + i * gap * ny
            a, b = (ox - length / 2 * ux, oy - length / 2 * uy), (ox + length / 2 * ux, oy + length / 2 * uy)
            label[_segment_distance(xx, yy, a, b) <= half] = HATCH
    return label


def _pool_layer(rng: np.random.Generator, pool: tuple[str, ...], h: int, w: int, zoom: float) -> np.ndarray:
    """A (h, w, 3) window of a random photograph of ``pool``; gray ones tinted with a random colour."""
    name = pool[int(rng.integers(len(pool)))]
    layer = _window(rng, _image(name), h, w, zoom)
    if np.allclose(layer[..., 0], layer[..., 1]) and np.allclose(layer[..., 1], layer[..., 2]):
        layer = layer * rng.uniform(0.55, 1.25, size=3).astype(np.float32)
    return layer


def render_shapes(label: np.ndarray, rng: np.random.Generator, pool: tuple[str, ...], contrast: tuple[float, float]
                  ) -> np.ndarray:
    """The ground is a window of a random photograph of ``pool``; every shape of the image is drawn in one "ink",
    another photograph's window whose brightness is moved away from the ground's by ``contrast`` (a range, random
    sign): all classes look alike, they differ by their shape only."""
    h, w = label.shape
    ground = _pool_layer(rng, pool, h, w, 2.0)
    level = float(ground.mean())
    ink = _pool_layer(rng, pool, h, w, 3.0)
    sign = 1.0 if level < 100 else -1.0 if level > 155 else rng.choice([-1.0, 1.0])
    goal = np.clip(level + sign * rng.uniform(*contrast), 15, 240)
    ink = ink * (goal / max(1.0, float(ink.mean())))
    return np.where((label != GROUND)[..., None], ink, ground)


def render_shape_source(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Source of ``shape``: the gray textures, tinted, at a clear brightness contrast; a little noise."""
    img = render_shapes(label, rng, SHAPE_SOURCE_POOL, (70, 120)) + rng.normal(0, 2, size=label.shape + (3,))
    return np.clip(img, 0, 255).astype(np.uint8)


def render_shape_target(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Target of ``shape``: colour photographs at a lower contrast, blended with another real photograph
    (α 0.2-0.4), lens blur and sensor noise."""
    h, w = label.shape
    img = render_shapes(label, rng, SHAPE_TARGET_POOL, (55, 100))
    blend = _pool_layer(rng, SHAPE_BLEND + SHAPE_TARGET_POOL, h, w, 2.5)
    alpha = rng.uniform(0.2, 0.4)
    img = (1 - alpha) * img + alpha * blend
    img = gaussian_blur(img, sigma=rng.uniform(0.3, 0.5))
    img += rng.normal(0, 5, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _source_sample(shift: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if shift == "shape":
        label = make_shape_layout(rng, size[1], size[0])
        return render_shape_source(label, rng), label
    label = make_layout(rng, size[1], size[0])
    if shift == "photo":
        return render_cartoon(label, rng), label
    image = render_photo(label, rng) + rng.normal(0, 2, size=label.shape + (3,))
    return np.clip(image, 0, 255).astype(np.uint8), label


def _target_sample(shift: str, rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    if shift == "shape":
        label = make_shape_layout(rng, size[1], size[0])
        return render_shape_target(label, rng), label
    if shift == "photo":
        label = make_layout(rng, size[1], size[0])
        return render_photo_target(label, rng), label
    label = zoom_layout(make_layout(rng, size[1], size[0], horizon=(0.4, 0.55)), rng, 1.4)
    return render_clutter_target(label, rng)


def write_shift(shift: str, root: str | Path, *, seed: int = 0, source_images: int = 160, target_train: int = 160,
                target_val: int = 60, size: tuple[int, int] = (128, 64)) -> tuple[Path, Path]:
    """Write shift ``shift`` ("photo", "clutter" or "shape") under ``root``: GTA5 layout in ``root/gta5``, Cityscapes
    layout in ``root/cityscapes`` (``leftImg8bit`` / ``gtFine`` ``{train,val}/<city>/``).

    ``size`` is (W, H) of every image. Returns ``(gta5_root, cityscapes_root)``. Deterministic in
    (shift, seed, counts, size); skips writing when a complete copy for the same arguments is there.
    """
    return write_layouts(root, shift, SHIFTS, seed, 4321, (source_images, target_train, target_val), size, 16,
                         lambda rng: _source_sample(shift, rng, size), lambda rng, split: _target_sample(shift, rng, size))


Sampler = Callable[..., tuple[np.ndarray, np.ndarray]]


def write_layouts(root: str | Path, shift: str, names: tuple[str, ...], seed: int, salt: int,
                  counts: tuple[int, int, int], size: tuple[int, int], min_side: int, source: Sampler,
                  target: Sampler) -> tuple[Path, Path]:
    """Check the arguments, then write ``counts`` = (source, target train, target val) samples, drawn in that order
    from ``source(rng)`` and ``target(rng, split)`` with one generator seeded by ``(seed, shift's index in names,
    salt)``, as ``root/gta5`` and ``root/cityscapes`` (cities ``<shift>train`` / ``<shift>val``), then
    ``root/.complete``; a folder already complete for the same arguments is not written again."""
    if shift not in names:
        raise ValueError(f"expected shift in {names}, got {shift!r}")
    if min(counts) < 1:
        raise ValueError(f"expected at least one image per split, got {', '.join(map(str, counts))}")
    if len(size) != 2 or min(size) < min_side:
        raise ValueError(f"expected size (W, H) with both sides >= {min_side}, got {size}")
    root = Path(root)
    marker, stamp = root / ".complete", f"{shift} {seed} {' '.join(map(str, counts))} {tuple(size)} v1"
    gta, cs = root / "gta5", root / "cityscapes"
    if marker.is_file() and marker.read_text() == stamp:
        return gta, cs
    rng = np.random.default_rng([seed, names.index(shift), salt])
    write_gta5_layout(gta, (source(rng) for _ in range(counts[0])))
    for split, count in (("train", counts[1]), ("val", counts[2])):
        write_cityscapes_layout(cs, split, f"{shift}{split}", (target(rng, split) for _ in range(count)))
    marker.write_text(stamp)
    return gta, cs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write a domain shift built from scikit-image's bundled photographs "
                                            "in the GTA5 / Cityscapes layouts.")
    p.add_argument("shift", choices=SHIFTS)
    p.add_argument("root", help="output folder (gets gta5/ and cityscapes/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source-images", type=int, default=160)
    p.add_argument("--target-train", type=int, default=160)
    p.add_argument("--target-val", type=int, default=60)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--height", type=int, default=64)
    a = p.parse_args(argv)
    gta, cs = write_shift(a.shift, a.root, seed=a.seed, source_images=a.source_images, target_train=a.target_train,
                          target_val=a.target_val, size=(a.width, a.height))
    print(f"--gta5-root {gta} --cityscapes-root {cs}")
    return 0


if __name__ == "__main__":  # python -m benchmarks.study.shifts
    sys.exit(main())
