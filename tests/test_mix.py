"""ClassMix masks, mixing and DAFormer's strong transform (examples/uda/mix.py), against plain loops.

The mask draw differs from DAFormer's numpy ``choice``, so its distribution is tested: exactly ceil(n/2) of the
present values, only present values, every subset reachable and all equally likely. The colour ops follow kornia
0.5.8 (DAFormer's pin) and are checked against per-pixel float64 loops of the documented formulas.
"""

from __future__ import annotations

import colorsys
import itertools
import math
import random
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from uda import mix as M

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
HOST_READS = {"_local_scalar_dense", "unique", "_unique", "_unique2", "unique_dim", "unique_consecutive",
              "nonzero", "nonzero_static", "masked_select", "lift_fresh", "is_nonzero"}


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _chosen(labels: torch.Tensor, masks: torch.Tensor) -> list[frozenset]:
    """The label values pasted in each image (every pixel of a value must agree)."""
    out = []
    for lab, m in zip(labels, masks[:, 0]):
        sets = {}
        for v, x in zip(lab.flatten().tolist(), m.flatten().tolist()):
            assert sets.setdefault(v, x) == x, "pixels of one label value disagree"
        out.append(frozenset(v for v, x in sets.items() if x == 1.0))
    return out


# ---------------------------------------------------------------------------------------------- class masks
def test_masks_choose_half_of_the_present_values_rounded_up():
    g = torch.Generator().manual_seed(0)
    labels = torch.full((6, 9, 11), 255, dtype=torch.long)
    present = [{0}, {3, 7}, {1, 2, 18}, {0, 4, 5, 6, 255}, set(range(19)), {255}]
    for i, values in enumerate(present):
        values = sorted(values)
        flat = labels[i].view(-1)
        for j in range(flat.numel()):  # every value occupies some pixels, and nothing else occurs
            flat[j] = values[j % len(values)]
    masks = M.class_mix_masks(labels, generator=g)
    assert masks.shape == (6, 1, 9, 11) and masks.dtype == torch.float32
    for values, chosen in zip(present, _chosen(labels, masks)):
        assert chosen <= values
        assert len(chosen) == math.ceil(len(values) / 2)
    # the mask is the loop's "label in chosen", in float64, for the chosen sets
    for b, chosen in enumerate(_chosen(labels, masks)):
        ref = torch.zeros(9, 11, dtype=torch.float64)
        for y in range(9):
            for x in range(11):
                ref[y, x] = 1.0 if int(labels[b, y, x]) in chosen else 0.0
        assert torch.equal(masks[b, 0].double(), ref)


def test_masks_include_the_ignore_id_as_daformer_does():
    labels = torch.tensor([[[0, 255], [5, 5]]]).repeat(300, 1, 1)  # n = 3 values, 2 chosen
    seen = Counter(_chosen(labels, M.class_mix_masks(labels, generator=torch.Generator().manual_seed(1))))
    assert set(seen) == {frozenset({0, 5}), frozenset({0, 255}), frozenset({5, 255})}


@pytest.mark.parametrize("n", [3, 4, 5])
def test_masks_are_uniform_over_subsets(n):
    draws = 6000
    labels = torch.arange(n).view(1, 1, n).repeat(draws, 2, 1)
    seen = Counter(_chosen(labels, M.class_mix_masks(labels, generator=torch.Generator().manual_seed(n))))
    subsets = [frozenset(s) for s in itertools.combinations(range(n), math.ceil(n / 2))]
    assert set(seen) == set(subsets)  # every subset reachable, nothing else
    expected = draws / len(subsets)
    chi2 = sum((seen[s] - expected) ** 2 / expected for s in subsets)
    assert chi2 < 30.0, chi2  # dof <= 9: p ~ 4e-4 at 30


def test_masks_deterministic_under_a_generator_and_accept_mmseg_layout():
    labels = torch.randint(0, 19, (3, 16, 16))
    a = M.class_mix_masks(labels, generator=torch.Generator().manual_seed(5))
    b = M.class_mix_masks(labels[:, None], generator=torch.Generator().manual_seed(5))
    c = M.class_mix_masks(labels, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert M.class_mix_masks(labels, dtype=torch.float64).dtype == torch.float64


def test_masks_from_the_batch_union_daformer_release():
    # image 0 holds {0, 1}, image 1 holds {2, 3}: the union has 4 values, 2 chosen for each image
    draws = 3000
    one = torch.tensor([[[0, 1], [0, 1]], [[2, 3], [2, 3]]])
    pasted = Counter()
    for k in range(draws // 500):
        labels = one.repeat(500, 1, 1)
        masks = M.class_mix_masks(labels, generator=torch.Generator().manual_seed(k), classes_from="batch")
        pasted.update(len(s) for s in _chosen(labels, masks)[0::2])  # pairs share one union: take image 0
    # not always one of two as per image: 0, 1 or 2 of image 0's values, with probabilities 1/6, 4/6, 1/6
    total = sum(pasted.values())
    assert set(pasted) == {0, 1, 2} and total == draws
    for k, p in ((0, 1 / 6), (1, 4 / 6), (2, 1 / 6)):
        assert abs(pasted[k] / total - p) < 0.03, (k, pasted[k] / total)
    per_image = M.class_mix_masks(one, generator=torch.Generator().manual_seed(0))
    assert [len(s) for s in _chosen(one, per_image)] == [1, 1]


def test_masks_read_nothing_back_to_the_host():
    labels = torch.randint(0, 19, (2, 8, 8), device="meta")  # a data-dependent read cannot run on meta
    with _Ops() as ops:
        masks = M.class_mix_masks(labels, classes_from="image")
        M.class_mix_masks(labels, classes_from="batch")
    assert masks.shape == (2, 1, 8, 8)
    assert not ops.names & HOST_READS, ops.names & HOST_READS


def test_masks_validate():
    with pytest.raises(ValueError, match="labels: expected dtype torch.int64"):
        M.class_mix_masks(torch.zeros(1, 2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels: expected values in \[0, 255\]"):
        M.class_mix_masks(torch.full((1, 2, 2), 256))
    with pytest.raises(ValueError, match="labels: expected a label map"):
        M.class_mix_masks(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="classes_from"):
        M.class_mix_masks(torch.zeros(1, 2, 2, dtype=torch.long), classes_from="pair")


# ---------------------------------------------------------------------------------------------------- mix
def test_mix_images_labels_and_weights():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(2, 1, 5, 4, generator=g) > 0.5).float()
    src, tgt = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    out = M.mix(mask, src, tgt)
    assert torch.equal(out, torch.where(mask.bool(), src, tgt))
    half = M.mix(mask, src.half(), tgt.half())
    assert half.dtype == torch.float16 and torch.equal(half, torch.where(mask.bool(), src.half(), tgt.half()))
    ls, lt = torch.randint(0, 19, (2, 5, 4), generator=g), torch.full((2, 5, 4), 255)
    lab = M.mix(mask, ls, lt)
    assert lab.dtype == torch.long
    for b, y, x in itertools.product(range(2), range(5), range(4)):
        assert lab[b, y, x] == (ls if mask[b, 0, y, x] == 1 else lt)[b, y, x]
    w = M.mix(mask, torch.ones(2, 5, 4), torch.full((2, 5, 4), 0.25))
    assert torch.equal(w, torch.where(mask[:, 0].bool(), 1.0, 0.25))
    soft = torch.full((2, 1, 5, 4), 0.25)
    assert torch.allclose(M.mix(soft, src, tgt), 0.25 * src + 0.75 * tgt)


def test_mix_validates():
    mask = torch.ones(1, 1, 2, 2)
    with pytest.raises(ValueError, match="target: expected the shape of source"):
        M.mix(mask, torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 3))
    with pytest.raises(ValueError, match="target: expected the dtype of source"):
        M.mix(mask, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="mask: expected shape"):
        M.mix(torch.ones(1, 2, 2), torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match="mask: expected shape .* to match source"):
        M.mix(mask, torch.zeros(1, 3, 2, 3), torch.zeros(1, 3, 2, 3))


# ------------------------------------------------------------------------------------------ colour jitter ops
def _hsv(r, g, b, eps=M.HSV_EPS):
    """Per-pixel reference of the documented formulas (kornia 0.5.8), in Python floats."""
    v, mn = max(r, g, b), min(r, g, b)
    d = v - mn
    s = d / (v + eps) if v + eps > 0 else 0.0
    if d == 0:
        return 0.0, s, v
    if r == v:
        x = (g - b) / d
    elif g == v:
        x = 2 + (b - r) / d
    else:
        x = 4 + (r - g) / d
    return 2 * math.pi * ((x / 6) % 1.0), s, v


def _rgb(h, s, v):
    u = (h / (2 * math.pi)) * 6 % 6
    i = int(math.floor(u))
    f = u - i
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _per_pixel(img, fn):
    out = torch.empty_like(img, dtype=torch.float64)
    for y, x in itertools.product(range(img.shape[-2]), range(img.shape[-1])):
        out[:, y, x] = torch.tensor(fn(*[float(c) for c in img[:, y, x]]), dtype=torch.float64)
    return out


@pytest.fixture
def image():
    img = torch.rand(3, 6, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    img[:, 0, 0] = 0.0  # black
    img[:, 0, 1] = 0.5  # grey
    img[:, 0, 2] = torch.tensor([0.7, 0.7, 0.2])  # r == g is the max: r's branch
    img[:, 0, 3] = torch.tensor([0.9, 0.1, 0.1])  # pure-ish red, hue 0
    return img


def test_hsv_round_trip_and_against_colorsys(image):
    hsv = M.rgb_to_hsv(image)
    assert torch.allclose(hsv, _per_pixel(image, lambda *c: _hsv(*c)), atol=1e-12)
    assert torch.allclose(M.hsv_to_rgb(hsv), _per_pixel(hsv, _rgb), atol=1e-12)
    plain = _per_pixel(image, lambda r, g, b: _rgb(*_hsv(r, g, b, eps=0.0)))
    assert torch.allclose(plain, image, atol=1e-12)  # the formulas invert each other without eps
    cs = _per_pixel(image, lambda *c: colorsys.rgb_to_hsv(*c))
    assert torch.allclose(hsv[0] / (2 * math.pi), cs[0], atol=1e-12)
    assert torch.allclose(hsv[1], cs[1], atol=1e-5)  # eps = 1e-6 in s


def test_brightness_and_contrast_against_loops(image):
    for shift in (-0.3, 0.15):
        ref = _per_pixel(image, lambda *c, k=shift: [min(max(x + k, 0.0), 1.0) for x in c])
        assert torch.allclose(M.adjust_brightness(image, shift), ref, atol=1e-15)
    for factor in (0.7, 1.4):
        ref = _per_pixel(image, lambda *c, k=factor: [min(max(x * k, 0.0), 1.0) for x in c])
        assert torch.allclose(M.adjust_contrast(image, factor), ref, atol=1e-15)


def test_saturation_and_hue_against_loops(image):
    for factor in (0.0, 0.8, 1.3):
        def sat(r, g, b, k=factor):
            h, s, v = _hsv(r, g, b)
            return _rgb(h, min(max(s * k, 0.0), 1.0), v)
        assert torch.allclose(M.adjust_saturation(image, factor), _per_pixel(image, sat), atol=1e-12)
    for radians in (-1.2, 0.4, 2 * math.pi * 0.2):
        def hue(r, g, b, a=radians):
            h, s, v = _hsv(r, g, b)
            return _rgb(math.fmod(h + a, 2 * math.pi), s, v)
        assert torch.allclose(M.adjust_hue(image, radians), _per_pixel(image, hue), atol=1e-12)
        # and a hue rotation is colorsys's, up to the eps in s
        def cs_hue(r, g, b, a=radians):
            h, s, v = colorsys.rgb_to_hsv(r, g, b)
            return colorsys.hsv_to_rgb((h + a / (2 * math.pi)) % 1.0, s, v)
        assert torch.allclose(M.adjust_hue(image, radians), _per_pixel(image, cs_hue), atol=1e-5)


def test_color_jitter_applies_the_ops_in_order(image):
    params = dict(brightness=1.1, contrast=0.85, saturation=1.2, hue=-0.1)
    ops = [lambda x: M.adjust_brightness(x, 1.1 - 1.0), lambda x: M.adjust_contrast(x, 0.85),
           lambda x: M.adjust_saturation(x, 1.2), lambda x: M.adjust_hue(x, -0.1 * 2 * math.pi)]
    outs = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        ref = image
        for k in order:
            ref = ops[k](ref)
        out = M.color_jitter(image, **params, order=order)
        assert torch.equal(out, ref)
        outs.append(out)
    assert not torch.allclose(*outs)
    with pytest.raises(ValueError, match="order: expected a permutation"):
        M.color_jitter(image, **params, order=[0, 0, 1, 2])


def test_jitter_parameter_ranges():
    rng = random.Random(0)
    for _ in range(200):
        p = M.sample_jitter_parameters(0.2, rng)
        assert 0.8 <= p["brightness"] <= 1.2 and 0.8 <= p["contrast"] <= 1.2 and 0.8 <= p["saturation"] <= 1.2
        assert -0.2 <= p["hue"] <= 0.2 and sorted(p["order"]) == [0, 1, 2, 3]
    p = M.sample_jitter_parameters(0.9, rng)
    assert p["brightness"] >= 0.1 and -0.5 <= p["hue"] <= 0.5


# ---------------------------------------------------------------------------------------------------- blur
def test_blur_kernel_size_rule():
    assert [M.blur_kernel_size(n) for n in (512, 720, 1024, 1280, 10, 20, 21, 30)] == [51, 71, 103, 127, 1, 1, 3, 3]


def _blur_loop(img, ky, kx, sigma):
    def g1(k):
        w = [math.exp(-((i - k // 2) ** 2) / (2 * sigma**2)) for i in range(k)]
        return [x / sum(w) for x in w]

    def reflect(i, n):
        return -i if i < 0 else (2 * (n - 1) - i if i >= n else i)

    wy, wx = g1(ky), g1(kx)
    c, h, w = img.shape
    out = torch.zeros(c, h, w, dtype=torch.float64)
    for ch, y, x in itertools.product(range(c), range(h), range(w)):
        acc = 0.0
        for i, j in itertools.product(range(ky), range(kx)):
            acc += wy[i] * wx[j] * float(img[ch, reflect(y + i - ky // 2, h), reflect(x + j - kx // 2, w)])
        out[ch, y, x] = acc
    return out


def test_gaussian_blur_against_a_loop():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 9, 11, dtype=torch.float64, generator=g)
    out = M.gaussian_blur(img, [0.8, 1.1], kernel_size=(3, 5))
    for b, sigma in enumerate((0.8, 1.1)):
        assert torch.allclose(out[b], _blur_loop(img[b], 3, 5, sigma), atol=1e-12)
    big = torch.rand(1, 3, 30, 21, dtype=torch.float64, generator=g)  # DAFormer's rule: kernel (3, 3)
    assert torch.allclose(M.gaussian_blur(big, 0.5)[0], _blur_loop(big[0], 3, 3, 0.5), atol=1e-12)
    k = M.gaussian_kernel1d(5, 1.0, dtype=torch.float64)
    e = [math.exp(-(i * i) / 2) for i in (-2, -1, 0, 1, 2)]
    assert torch.allclose(k, torch.tensor(e, dtype=torch.float64) / sum(e), atol=1e-15)


# ------------------------------------------------------------------------------------------ strong transform
def _batch(dtype=torch.float32, b=2, h=20, w=24):
    img01 = torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    m, s = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1), torch.tensor(STD, dtype=torch.float64).view(
        1, 3, 1, 1)
    return ((img01 * 255 - m) / s).to(dtype)


def test_identity_without_jitter_or_blur():
    x = _batch()
    for seed in range(20):
        assert torch.equal(M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=1.0, blur=False,
                                              rng=random.Random(seed)), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_device(dtype):
    x = _batch(dtype)
    out = M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=0.0, rng=random.Random(1))
    assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
    assert torch.isfinite(out).all()


def test_strong_transform_replays_its_draws():
    x = _batch(torch.float64)
    m, s = torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1), torch.tensor(STD, dtype=torch.float64).view(
        1, 3, 1, 1)
    seeds = [seed for seed in range(50) if random.Random(seed).random() > 0.2]
    both = [seed for seed in seeds if (r := random.Random(seed), r.uniform(0, 1), r.uniform(0, 1))[2] > 0.5]
    for seed in (both[0], next(q for q in seeds if q not in both)):
        replay = random.Random(seed)
        jitter, blurring = replay.uniform(0, 1) > 0.2, replay.uniform(0, 1) > 0.5
        assert jitter
        imgs, sigmas = [], []
        for i in range(x.shape[0]):
            imgs.append(M.color_jitter((x[i:i + 1] * s + m)[0] / 255, **M.sample_jitter_parameters(0.2, replay)))
            if blurring:
                sigmas.append(replay.uniform(0.15, 1.15))
        ref = (torch.stack(imgs) * 255 - m) / s
        if blurring:
            ref = M.gaussian_blur(ref, sigmas, kernel_size=(1, 3))  # 20 x 24: DAFormer's kernel (1, 3)
        out = M.strong_transform(x, mean=MEAN, std=STD, rng=random.Random(seed))
        assert torch.allclose(out, ref, atol=1e-9)
        assert not torch.allclose(out, x)


def test_jitter_runs_with_probability_one_minus_p():
    x = _batch(b=1, h=2, w=2)
    runs = sum(not torch.equal(M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=0.2, blur=False,
                                                  rng=random.Random(seed)), x) for seed in range(400))
    assert abs(runs / 400 - 0.8) < 0.06


def test_no_nan_on_constant_images():
    for value in (0.0, 0.5, 1.0):
        x01 = torch.full((2, 3, 12, 12), value)
        x = (x01 * 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        for seed in range(5):
            out = M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=0.0, color_jitter_strength=0.5,
                                     rng=random.Random(seed))
            assert torch.isfinite(out).all()
        for op in (lambda t: M.adjust_saturation(t, 1.5), lambda t: M.adjust_hue(t, 1.0), M.rgb_to_hsv):
            assert torch.isfinite(op(x01)).all()


def test_strong_transform_reads_nothing_back_to_the_host():
    x = torch.zeros(2, 3, 24, 24, device="meta")
    with _Ops() as ops:
        out = M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=0.0, rng=random.Random(2))
    assert out.shape == x.shape
    assert "convolution" in ops.names and "gather" in ops.names  # both jitter and blur ran
    assert not ops.names & HOST_READS, ops.names & HOST_READS


def test_strong_transform_validates():
    x = _batch()
    with pytest.raises(ValueError, match="mean: expected 3 values"):
        M.strong_transform(x, mean=(1.0, 2.0), std=STD, color_jitter_p=0.0, rng=random.Random(0))
    with pytest.raises(ValueError, match="images: expected a Tensor"):
        M.strong_transform(x[:, :2], mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="color_jitter_p"):
        M.strong_transform(x, mean=MEAN, std=STD, color_jitter_p=1.5)
