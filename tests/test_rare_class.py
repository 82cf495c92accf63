"""Rare class sampling (examples/uda/rare_class.py): DAFormer's RCS, against hand values and plain loops."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from uda import rare_class as R

# three files, four classes: pixels per class over the dataset 600, 300, 100, 0 (f = 0.6, 0.3, 0.1, -)
COUNTS = np.array([[400, 100, 0, 0],
                   [200, 200, 0, 0],
                   [0, 0, 100, 0]])


def test_class_pixel_counts():
    label = np.array([[0, 0, 255], [2, 255, 2], [2, 1, 0]], dtype=np.uint8)
    assert R.class_pixel_counts(label, 4) == [3, 1, 3, 0]
    assert R.class_pixel_counts(torch.from_numpy(label).long(), 4) == [3, 1, 3, 0]
    with pytest.raises(ValueError, match=r"label: expected train ids in \[0, 3\) or 255, got values in \[0, 3\]"):
        R.class_pixel_counts(np.array([[0, 3]]), 3)
    with pytest.raises(ValueError, match="label: expected an integer dtype"):
        R.class_pixel_counts(np.zeros((2, 2)), 3)


def test_probabilities_by_hand():
    # T = 0.5: logits (1 - f) / T = 0.8, 1.4, 1.8 for the classes that occur; class 3 never occurs
    e = [math.exp(0.8), math.exp(1.4), math.exp(1.8)]
    expected = np.array([e[0], e[1], e[2], 0.0]) / sum(e)
    assert np.allclose(R.rcs_probabilities(COUNTS, 0.5), expected, rtol=1e-14, atol=0)
    # T = 0.01 (DAFormer): p_c / p_k = exp((f_k - f_c) / T); the rarest class takes nearly everything
    p = R.rcs_probabilities(COUNTS, 0.01)
    assert p[3] == 0.0 and math.isclose(p.sum(), 1.0)
    assert math.isclose(p[1] / p[2], math.exp((0.1 - 0.3) / 0.01), rel_tol=1e-9)
    assert math.isclose(p[0] / p[2], math.exp((0.1 - 0.6) / 0.01), rel_tol=1e-9)
    # pixel shares, not file counts: doubling one file's pixels changes p
    assert not np.allclose(R.rcs_probabilities(COUNTS * [[2], [1], [1]], 0.5), expected)
    with pytest.raises(ValueError, match="temperature"):
        R.rcs_probabilities(COUNTS, 0.0)
    with pytest.raises(ValueError, match="counts: expected at least one counted pixel"):
        R.rcs_probabilities(np.zeros((2, 3), dtype=np.int64))


def test_files_with_class_is_strictly_above_min_pixels():
    counts = np.array([[3000, 0], [3001, 5000], [10, 2999]])
    files = R.files_with_class(counts, 3000)
    assert [f.tolist() for f in files] == [[1], [1]]
    assert [f.tolist() for f in R.files_with_class(counts, 0)] == [[0, 1, 2], [1, 2]]


def test_sampler_excludes_classes_without_files_and_renormalises():
    counts = np.array([[5000, 4000, 200], [6000, 0, 100]])  # class 2 occurs but never above 3000 pixels
    sampler = R.RareClassSampler(R.RareClassStats(("a", "b"), counts), temperature=0.5, min_pixels=3000)
    p = R.rcs_probabilities(counts, 0.5)
    assert sampler.probabilities[2] == 0.0
    assert np.allclose(sampler.probabilities[:2], p[:2] / p[:2].sum(), rtol=1e-14)
    with pytest.raises(ValueError, match="stats: expected a class with a file"):
        R.RareClassSampler(R.RareClassStats(("a",), np.array([[10, 20]])))


def test_sampler_draws_rare_classes_more_often_and_files_uniformly():
    rng = np.random.default_rng(0)
    counts = rng.integers(3001, 6000, size=(40, 3)) * np.array([1, 4, 20])  # class 0 rare, class 2 frequent
    counts[::2, 0] = 0  # class 0 in the odd files only
    sampler = R.RareClassSampler(R.RareClassStats(tuple(map(str, range(40))), counts), temperature=0.2)
    draws = [sampler.sample(i) for i in range(4000)]
    by_class = Counter(c for c, _ in draws)
    assert by_class[0] > by_class[1] > by_class[2] > 0
    for c in range(3):  # the class frequencies follow the probabilities
        assert abs(by_class[c] / 4000 - sampler.probabilities[c]) < 0.03
    files0 = Counter(f for c, f in draws if c == 0)
    assert set(files0) == set(range(1, 40, 2))  # only files with the class, all of them
    n = by_class[0]
    chi2 = sum((files0[f] - n / 20) ** 2 / (n / 20) for f in range(1, 40, 2))
    assert chi2 < 45.0, chi2  # 19 dof: p ~ 7e-4


def test_sample_is_a_pure_function_of_seed_and_index():
    stats = R.RareClassStats(("a", "b", "c"), COUNTS * 100)
    a = R.RareClassSampler(stats, seed=7, temperature=0.5)
    b = R.RareClassSampler(R.RareClassStats.from_json(stats.to_json()), seed=7, temperature=0.5)
    run = [a.sample(i) for i in range(200)]
    assert [b.sample(i) for i in range(100, 200)] == run[100:]  # a resumed run continues exactly
    assert [a.sample(i) for i in reversed(range(200))] == run[::-1]
    other = R.RareClassSampler(stats, seed=8, temperature=0.5)
    assert [other.sample(i) for i in range(200)] != run
    assert a.rng(3, stream=1).integers(1 << 30) == b.rng(3, stream=1).integers(1 << 30)
    assert a.rng(3, stream=1).integers(1 << 30) != a.rng(3).integers(1 << 30)


def test_stats_json_round_trip(tmp_path):
    labels = [np.array([[0, 1], [255, 1]]), np.array([[2, 2], [2, 2]])]
    stats = R.RareClassStats.from_labels(["x.png", "y.png"], labels, 3)
    assert stats.counts.tolist() == [[1, 2, 0], [0, 0, 4]] and stats.counts.dtype == np.int64
    back = R.RareClassStats.from_json(stats.to_json())
    assert back.files == stats.files and np.array_equal(back.counts, stats.counts) and back.num_classes == 3
    stats.save(tmp_path / "rcs.json")
    loaded = R.RareClassStats.load(tmp_path / "rcs.json")
    assert loaded.files == stats.files and np.array_equal(loaded.counts, stats.counts)
    assert not list(tmp_path.glob("*.tmp"))
    empty = R.RareClassStats.from_json(R.RareClassStats((), np.zeros((0, 19), dtype=np.int64)).to_json())
    assert empty.counts.shape == (0, 19)
    with pytest.raises(ValueError, match="format"):
        R.RareClassStats.from_json('{"format": "pickle"}')
    with pytest.raises(ValueError, match="invalid JSON"):
        R.RareClassStats.from_json("{")
    with pytest.raises(ValueError, match="counts: expected one row per file"):
        R.RareClassStats(("a",), np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ValueError):
        stats.counts[0, 0] = 5  # read-only


# ---------------------------------------------------------------------------------------------------- crops
def _mmseg_box(label, crop, rng, cat_max_ratio, ignore=255):
    """mmseg RandomCrop, written out with np.unique as mmseg does."""
    (hh, ww), (h, w) = label.shape, crop

    def draw():
        return int(rng.integers(0, max(hh - h, 0) + 1)), int(rng.integers(0, max(ww - w, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            values, cnt = np.unique(label[top:top + h, left:left + w], return_counts=True)
            cnt = cnt[values != ignore]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def _daformer_crop(label, crop, c, rng, min_pixels, ratio, cat_max_ratio):
    """get_rare_class_sample's loop, pixel counts by hand."""
    top, left = _mmseg_box(label, crop, rng, cat_max_ratio)
    for _ in range(10):
        n = 0
        for y in range(top, min(top + crop[0], label.shape[0])):
            for x in range(left, min(left + crop[1], label.shape[1])):
                n += int(label[y, x] == c)
        if n > min_pixels * ratio:
            break
        top, left = _mmseg_box(label, crop, rng, cat_max_ratio)
    return top, left


@pytest.mark.parametrize("cat_max_ratio", [1.0, 0.75])
def test_crop_with_class_against_daformer_loop(cat_max_ratio):
    label = np.zeros((40, 60), dtype=np.int64)
    label[:, 30:] = 1
    label[30:, 50:] = 2  # class 2: a 10 x 10 corner
    label[:5, :5] = 255
    for seed in range(30):
        for c, min_pixels in ((2, 80), (2, 300), (7, 10), (1, 100)):  # 300: the corner never suffices
            got = R.crop_with_class(label, (16, 16), c, rng=np.random.default_rng(seed), min_pixels=min_pixels,
                                    cat_max_ratio=cat_max_ratio)
            ref = _daformer_crop(label, (16, 16), c, np.random.default_rng(seed), min_pixels, 0.5, cat_max_ratio)
            assert got == ref


def test_crop_with_class_finds_the_class_and_handles_small_images():
    label = np.zeros((40, 60), dtype=np.int64)
    label[30:, 50:] = 2
    hits = 0
    for seed in range(50):
        top, left = R.crop_with_class(label, (24, 24), 2, rng=np.random.default_rng(seed), min_pixels=2,
                                      cat_max_ratio=1.0)
        hits += int((label[top:top + 24, left:left + 24] == 2).sum() > 1)
    plain = sum(int((label[t:t + 24, x:x + 24] == 2).sum() > 1)
                for t, x in (R.random_crop_origin((40, 60), (24, 24), np.random.default_rng(s)) for s in range(50)))
    # one crop holds > 1 pixel of the corner with probability 99 / 629; eleven tries: 0.85
    assert hits >= 35 and plain <= 15, (hits, plain)
    assert R.crop_with_class(np.zeros((8, 8), dtype=np.int64), (16, 16), 0, rng=np.random.default_rng(0)) == (0, 0)
    assert R.crop_with_class(label, (16, 16), 2, rng=np.random.default_rng(3), min_crop_ratio=0,
                             cat_max_ratio=1.0) == R.random_crop_origin((40, 60), (16, 16), np.random.default_rng(3))
    with pytest.raises(ValueError, match="label: expected the"):
        R.random_crop_origin((40, 60), (16, 16), np.random.default_rng(0), cat_max_ratio=0.75)
