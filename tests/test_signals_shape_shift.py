"""The ``shape`` shift of the study (issue 20): classes that differ by shape only, thin structures, real photos."""

from __future__ import annotations

import numpy as np
import pytest
from uda.datasets import cityscapes_files, gta5_files
from uda.labels import read_label
from PIL import Image

from benchmarks.study import shifts

KW = {"source_images": 12, "target_train": 12, "target_val": 2, "size": (128, 64)}


@pytest.fixture(scope="module")
def shape_roots(tmp_path_factory):
    return shifts.write_shift("shape", tmp_path_factory.mktemp("shape"), seed=3, **KW)


def _pairs(files):
    for sample in files:
        image = np.asarray(Image.open(sample.image).convert("RGB"), np.float64)
        yield image, read_label(sample.label, image.shape[1::-1])


def test_its_photographs_are_in_the_installed_wheel():
    folder = shifts.skimage_data_dir()
    for name in {*shifts.SHAPE_SOURCE_POOL, *shifts.SHAPE_TARGET_POOL, *shifts.SHAPE_BLEND}:
        assert (folder / name).is_file(), name
        assert shifts._image(name).std() > 5  # a real, non-constant picture


def test_every_class_occurs_and_the_thin_ones_are_thin(shape_roots):
    gta, cs = shape_roots
    labels = [lab for _, lab in _pairs(gta5_files(gta) + cityscapes_files(cs, "train"))]
    seen = set(np.unique(np.stack(labels)).tolist())
    assert seen == set(shifts.SHAPE_CLASSES)  # nothing else, no ignore
    for cls in (shifts.STROKE, shifts.HATCH, shifts.RING):
        # thin: eroding the class's mask by a 5x5 square (a pixel whose 5x5 neighbourhood is all of the class)
        # leaves almost nothing, while a filled disc keeps its core
        def core(lab, c):
            m = np.pad(lab == c, 2)
            inner = np.ones_like(lab, bool)
            for dy in range(5):
                for dx in range(5):
                    inner &= m[dy:dy + lab.shape[0], dx:dx + lab.shape[1]]
            return inner.sum() / max(1, (lab == c).sum())

        assert np.mean([core(lab, cls) for lab in labels if (lab == cls).any()]) < 0.1, cls
    assert np.mean([core(lab, shifts.DISC) for lab in labels if (lab == shifts.DISC).sum() > 80]) > 0.2


def test_brightness_says_nothing_about_the_class():
    """Every shape of an image is drawn in the same ink: each class's contrast to the ground (its mean brightness
    minus the ground's, in absolute value) has nearly the same mean in every class, well inside its spread over
    images, in both domains."""
    for render in (shifts.render_shape_source, shifts.render_shape_target):
        rng = np.random.default_rng(3)
        per_class = {c: [] for c in shifts.SHAPE_CLASSES[1:]}
        for _ in range(30):
            lab = shifts.make_shape_layout(rng, 64, 128)
            gray = render(lab, rng).astype(np.float64).mean(-1)
            ground = gray[lab == shifts.GROUND].mean()
            for c, values in per_class.items():
                if (lab == c).sum() > 30:
                    values.append(abs(gray[lab == c].mean() - ground))
        means = [np.mean(v) for v in per_class.values()]
        spread = np.std(np.concatenate(list(per_class.values())))
        assert max(means) - min(means) < 0.6 * spread, (render.__name__, means, spread)


def test_the_target_is_blended_with_photographs(shape_roots):
    """The target's shapes stand out less from their ground than the source's (lower contrast + a blended photo)."""
    gta, cs = shape_roots

    def contrast(files):
        return np.mean([abs(image[lab != shifts.GROUND].mean() - image[lab == shifts.GROUND].mean())
                        for image, lab in _pairs(files)])

    assert contrast(cityscapes_files(cs, "train")) < 0.9 * contrast(gta5_files(gta))


def test_layout_is_seeded_and_scales():
    a = shifts.make_shape_layout(np.random.default_rng(1), 64, 128)
    b = shifts.make_shape_layout(np.random.default_rng(1), 64, 128)
    assert np.array_equal(a, b) and a.dtype == np.uint8
    big = shifts.make_shape_layout(np.random.default_rng(1), 128, 256)
    assert big.shape == (128, 256) and set(np.unique(big)) <= set(shifts.SHAPE_CLASSES)
