r"""Pixel-prototype contrastive loss (spec section 3) against the float64 loop reference."""

import itertools

import numpy as np
import pytest
import reference as ref
import torch

from protocl import (
    cosine_similarity_map,
    PixelPrototypeContrastiveLoss,
    bcl_loss,
    fcl_loss,
    masked_average_pool,
    overlap_class_weight,
    pixel_prototype_contrastive_loss,
)

B, K, D = 2, 5, 3
GRID, LABEL = (3, 4), (7, 9)  # non-integer ratios both ways


def _inputs(b_n=B, k_n=K, dim=D, grid=GRID, label=LABEL, dtype=torch.float64, present=None):
    feats = torch.randn(b_n, dim, *grid, dtype=dtype)
    protos = torch.randn(b_n, k_n, dim, dtype=dtype)
    labels = ref.random_labels(b_n, *label, k_n, present=present)
    return feats, protos, labels


def _close(got, expected, rtol=1e-9, atol=1e-11):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(got.detach().cpu().double(), expected, rtol=rtol, atol=atol)


def _configs():
    r"""(prototype layout, valid layout, class_weight layout) combinations, all of them."""
    return list(itertools.product(["batch", "shared"], [None, "k", "bk"], [None, "k", "bk"]))


def _make(layout, feats, protos, gen):
    proto, valid, weight = layout
    p = protos if proto == "batch" else protos[0]
    v = None
    if valid == "k":
        v = torch.rand(K, generator=gen) > 0.3
        v[1] = False
    elif valid == "bk":
        v = torch.rand(B, K, generator=gen) > 0.3
        v[:, 2] = False
    w = None
    if weight == "k":
        w = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    elif weight == "bk":
        w = torch.rand(B, K, generator=gen, dtype=torch.float64)
        w[0, 0] = 0.0
    return p, v, w


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("at", ["feature", "label"])
@pytest.mark.parametrize("absent", ["mask", "min_similarity"])
def test_matches_reference(absent, at, reduction, device):
    gen = torch.Generator().manual_seed(1)
    feats, protos, labels = _inputs()
    for layout in _configs():
        p, v, w = _make(layout, feats, protos, gen)
        kw = {
            "valid": v,
            "class_weight": w,
            "temperature": 0.2,
            "absent": absent,
            "at": at,
            "reduction": reduction,
        }
        dev = {k: (x.to(device) if isinstance(x, torch.Tensor) else x) for k, x in kw.items()}
        got = pixel_prototype_contrastive_loss(feats.to(device), p.to(device), labels.to(device), **dev)
        expected = ref.contrastive_loss(feats, p, labels, **kw)
        if reduction == "none":
            assert got.shape == ((B, *GRID) if at == "feature" else (B, *LABEL)), layout
        else:
            assert got.shape == (), layout
        assert got.dtype == torch.float64
        _close(got, expected)


@pytest.mark.parametrize("at", ["feature", "label"])
def test_downsampled_and_upsampled_labels(at):
    for grid, label in [((6, 5), (3, 2)), ((4, 4), (16, 16)), ((5, 7), (5, 7)), ((2, 9), (13, 4))]:
        feats, protos, labels = _inputs(grid=grid, label=label)
        got = pixel_prototype_contrastive_loss(feats, protos, labels, at=at, absent="min_similarity")
        _close(got, ref.contrastive_loss(feats, protos, labels, at=at, absent="min_similarity"))


@pytest.mark.parametrize("min_purity", [0.75, 0.4, 0.95])
def test_purity_resize_matches_reference(min_purity):
    feats, protos, _ = _inputs(grid=(4, 4))
    labels = ref.blocky_labels(B, 13, 11, K, block=3)  # non-integer ratios: mixed cells
    got = pixel_prototype_contrastive_loss(feats, protos, labels, resize="purity", min_purity=min_purity)
    _close(got, ref.contrastive_loss(feats, protos, labels, resize="purity", min_purity=min_purity))


def test_label_equals_feature_when_sizes_match():
    feats, protos, labels = _inputs(grid=(5, 6), label=(5, 6))
    for absent in ("mask", "min_similarity"):
        a = pixel_prototype_contrastive_loss(
            feats, protos, labels, at="feature", absent=absent, reduction="none"
        )
        b = pixel_prototype_contrastive_loss(
            feats, protos, labels, at="label", absent=absent, reduction="none"
        )
        torch.testing.assert_close(a, b)


def test_fcl_and_bcl_are_the_named_directions():
    feats, protos, labels = _inputs()
    valid = torch.tensor([True, False, True, True, False])
    weight = torch.rand(K, dtype=torch.float64)
    kw = {
        "valid": valid,
        "class_weight": weight,
        "temperature": 0.3,
        "absent": "min_similarity",
        "at": "label",
    }
    general = pixel_prototype_contrastive_loss(feats, protos, labels, **kw)
    torch.testing.assert_close(fcl_loss(feats, protos, labels, **kw), general)
    torch.testing.assert_close(bcl_loss(feats, protos, labels, **kw), general)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_module_equals_function(reduction):
    feats, protos, labels = _inputs()
    valid = torch.rand(B, K) > 0.4
    weight = torch.rand(B, K, dtype=torch.float64)
    kw = {"temperature": 0.5, "absent": "min_similarity", "at": "label", "reduction": reduction}
    crit = PixelPrototypeContrastiveLoss(**kw)
    torch.testing.assert_close(
        crit(feats, protos, labels, valid=valid, class_weight=weight),
        pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, class_weight=weight, **kw),
    )


@pytest.mark.parametrize("at", ["feature", "label"])
@pytest.mark.parametrize("case", ["all_ignored", "no_valid_prototype", "zero_class_weight"])
def test_empty_mean_is_zero_with_zero_grads(case, at):
    feats, protos, labels = _inputs()
    feats.requires_grad_(True)
    protos.requires_grad_(True)
    kw = {"at": at}
    if case == "all_ignored":
        labels = torch.full_like(labels, 255)
    elif case == "no_valid_prototype":
        kw["valid"] = torch.zeros(K, dtype=torch.bool)
    else:
        kw["class_weight"] = torch.zeros(K, dtype=torch.float64)
    loss = pixel_prototype_contrastive_loss(feats, protos, labels, **kw)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.all(feats.grad == 0) and torch.all(protos.grad == 0)


def test_all_ignored_none_and_sum_are_zero():
    feats, protos, labels = _inputs()
    labels = torch.full_like(labels, 255)
    assert torch.all(pixel_prototype_contrastive_loss(feats, protos, labels, reduction="none") == 0)
    assert pixel_prototype_contrastive_loss(feats, protos, labels, reduction="sum").item() == 0.0


def test_mean_is_class_weighted_mean():
    # F.cross_entropy semantics: mean = sum(w_y l) / sum(w_y); scaling all class weights leaves it unchanged
    feats, protos, labels = _inputs()
    weight = torch.rand(K, dtype=torch.float64) + 0.1
    m1 = pixel_prototype_contrastive_loss(feats, protos, labels, class_weight=weight)
    m3 = pixel_prototype_contrastive_loss(feats, protos, labels, class_weight=3 * weight)
    s1 = pixel_prototype_contrastive_loss(feats, protos, labels, class_weight=weight, reduction="sum")
    s3 = pixel_prototype_contrastive_loss(feats, protos, labels, class_weight=3 * weight, reduction="sum")
    torch.testing.assert_close(m1, m3)
    torch.testing.assert_close(s3, 3 * s1)


def test_mean_over_feature_cells_matches_cross_entropy():
    # at="feature", sizes equal: the loss is F.cross_entropy of the cosine logits (independent formulation)
    feats, protos, labels = _inputs(grid=(4, 5), label=(4, 5))
    weight = torch.rand(K, dtype=torch.float64)
    cos = torch.einsum(
        "bdhw,bkd->bkhw",
        torch.nn.functional.normalize(feats, dim=1),
        torch.nn.functional.normalize(protos, dim=2),
    )
    expected = torch.nn.functional.cross_entropy(cos / 0.1, labels, weight=weight, ignore_index=255)
    got = pixel_prototype_contrastive_loss(feats, protos, labels, class_weight=weight)
    torch.testing.assert_close(got, expected)


def test_one_class_only_and_class_zero():
    feats, protos, _ = _inputs()
    labels = torch.zeros(B, *LABEL, dtype=torch.int64)
    for absent in ("mask", "min_similarity"):
        got = pixel_prototype_contrastive_loss(feats, protos, labels, absent=absent)
        assert got.item() > 0  # class 0 pixels do contribute
        _close(got, ref.contrastive_loss(feats, protos, labels, absent=absent))
    # a single valid prototype under "mask": the softmax has one entry, the loss is exactly 0
    valid = torch.zeros(K, dtype=torch.bool)
    valid[0] = True
    got = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid)
    assert abs(got.item()) < 1e-12


def test_single_class_model():
    feats, protos, _ = _inputs(k_n=1)
    labels = torch.zeros(B, *LABEL, dtype=torch.int64)
    got = pixel_prototype_contrastive_loss(feats, protos, labels)
    assert abs(got.item()) < 1e-12


def test_absent_modes_differ_as_specified():
    feats, protos, labels = _inputs(present=[0, 1, 2])
    valid = torch.tensor([True, True, False, False, False])
    mask = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, reduction="none")
    minsim = pixel_prototype_contrastive_loss(
        feats, protos, labels, valid=valid, absent="min_similarity", reduction="none"
    )
    y = torch.from_numpy(ref.resize_nearest(labels, GRID))
    assert torch.all(mask[y == 2] == 0)  # class without prototype: no contribution under "mask"
    assert torch.all(minsim[y == 2] > 0)  # ... but contributes under "min_similarity"


def test_min_similarity_equals_cosine_minus_one():
    # an invalid prototype behaves as a prototype at cosine exactly -1 from every pixel
    feats, protos, labels = _inputs(k_n=3, present=[0, 1])
    valid = torch.tensor([True, True, False])
    got = pixel_prototype_contrastive_loss(
        feats, protos, labels, valid=valid, absent="min_similarity", reduction="none"
    )
    cos = torch.einsum(
        "bdhw,bkd->bkhw",
        torch.nn.functional.normalize(feats, dim=1),
        torch.nn.functional.normalize(protos, dim=2),
    )
    cos[:, 2] = -1.0
    y = torch.from_numpy(ref.resize_nearest(labels, GRID))
    expected = torch.nn.functional.cross_entropy(cos / 0.1, y, ignore_index=255, reduction="none")
    torch.testing.assert_close(got, expected)


def test_non_contiguous_inputs():
    feats = torch.randn(B, 4, 3, D, dtype=torch.float64).permute(0, 3, 2, 1)  # (B, D, 3, 4)
    protos = torch.randn(D, K, B, dtype=torch.float64).permute(2, 1, 0)  # (B, K, D)
    labels = ref.random_labels(B, 9, 7, K).transpose(1, 2)  # (B, 7, 9)
    valid = (torch.rand(K, B) > 0.3).t()
    for at in ("feature", "label"):
        got = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, at=at)
        _close(got, ref.contrastive_loss(feats, protos, labels, valid=valid, at=at))


def test_no_nan_with_tiny_temperature_and_zero_vectors():
    # peer mistakes: softmax().log() and log(0); zero features/prototypes must not produce NaN
    feats, protos, labels = _inputs()
    feats[:, :, 0, 0] = 0.0
    protos[:, 0] = 0.0
    feats.requires_grad_(True)
    protos.requires_grad_(True)
    for absent, at in itertools.product(("mask", "min_similarity"), ("feature", "label")):
        loss = pixel_prototype_contrastive_loss(feats, protos, labels, temperature=1e-3, absent=absent, at=at)
        assert torch.isfinite(loss)
        grads = torch.autograd.grad(loss, (feats, protos))
        assert all(torch.all(torch.isfinite(g)) for g in grads)
        _close(
            loss,
            ref.contrastive_loss(feats, protos, labels, temperature=1e-3, absent=absent, at=at),
            rtol=1e-7,
        )


@pytest.mark.parametrize("at", ["feature", "label"])
@pytest.mark.parametrize("absent", ["mask", "min_similarity"])
def test_gradcheck(absent, at):
    feats, protos, labels = _inputs(b_n=2, k_n=3, dim=2, grid=(2, 3), label=(5, 4))
    valid = torch.tensor([[True, False, True], [True, True, True]])
    weight = torch.rand(2, 3, dtype=torch.float64)
    feats.requires_grad_(True)
    protos.requires_grad_(True)

    def fn(f, p):
        return pixel_prototype_contrastive_loss(
            f, p, labels, valid=valid, class_weight=weight, absent=absent, at=at, temperature=0.5
        )

    assert torch.autograd.gradcheck(fn, (feats, protos), fast_mode=True)


@pytest.mark.parametrize("shared", [False, True])
def test_cosine_map_gradcheck_including_floored_norms(shared):
    # the cosine's hand-written backward, with a pixel and a prototype whose norms are floored at eps
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 3, 2, 3, generator=g, dtype=torch.float64)
    feats[0, :, 1, 2] = 1e-5  # norm 1.7e-5 < eps: the floor is a constant
    shape = (3, 3) if shared else (2, 4, 3)
    protos = torch.randn(*shape, generator=g, dtype=torch.float64)
    protos[..., 1, :] = 2e-5
    feats.requires_grad_(True)
    protos.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, p: cosine_similarity_map(f, p, eps=1e-3), (feats, protos))


@pytest.mark.parametrize("shared", [False, True])
def test_cosine_gradients_equal_autograd_of_the_formula(shared):
    # the fused backward against autograd through the spec's formula, on channels-last (non-contiguous) features
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 5, 4, 3, generator=g, dtype=torch.float64).to(memory_format=torch.channels_last)
    shape = (4, 5) if shared else (2, 4, 5)
    protos = torch.randn(*shape, generator=g, dtype=torch.float64)
    weights = torch.randn(2, 4, 4, 3, generator=g, dtype=torch.float64)

    def formula(f, p):
        fn = f / f.norm(dim=1, keepdim=True).clamp_min(1e-6)
        pn = p / p.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.einsum("bdhw,kd->bkhw", fn, pn) if p.ndim == 2 else torch.einsum("bdhw,bkd->bkhw", fn, pn)

    leaves = [feats.clone().requires_grad_(True), protos.clone().requires_grad_(True)]
    expected = torch.autograd.grad((formula(*leaves) * weights).sum(), leaves)
    mine = [feats.clone().requires_grad_(True), protos.clone().requires_grad_(True)]
    got = torch.autograd.grad((cosine_similarity_map(*mine) * weights).sum(), mine)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert a.shape == b.shape


def test_cosine_double_backward_is_refused_not_wrong():
    feats = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(cosine_similarity_map(feats, torch.randn(2, 3, dtype=torch.float64)).sum(), feats,
                                  create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("at", ["feature", "label"])
def test_half_inputs_close_to_fp32(dtype, at):
    feats, protos, labels = _inputs(dtype=torch.float32, grid=(6, 6), label=(13, 11))
    feats, protos = feats.to(dtype), protos.to(dtype)
    got = pixel_prototype_contrastive_loss(feats, protos, labels, at=at, absent="min_similarity")
    expected = pixel_prototype_contrastive_loss(
        feats.float(), protos.float(), labels, at=at, absent="min_similarity"
    )
    assert got.dtype in (torch.float32, dtype)
    torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-3)


def test_fp32_matches_float64_reference():
    feats, protos, labels = _inputs(dtype=torch.float32)
    got = pixel_prototype_contrastive_loss(feats, protos, labels, at="label")
    assert got.dtype == torch.float32
    _close(got, ref.contrastive_loss(feats, protos, labels, at="label"), rtol=1e-5, atol=1e-6)


def test_label_level_loss_never_materialises_label_resolution_logits():
    b_n, k_n, dim, grid, label = 2, 8, 4, (4, 4), (64, 64)
    feats = torch.randn(b_n, dim, *grid, requires_grad=True)
    protos = torch.randn(b_n, k_n, dim, requires_grad=True)
    labels = ref.random_labels(b_n, *label, k_n)
    with ref.LargestFloatProbe() as probe:
        loss = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", absent="min_similarity")
        loss.backward()
    # (B, K, H, W) logits would be 65536 floats; per-pixel maps (B, H, W) are 8192
    assert probe.largest < b_n * k_n * label[0] * label[1] // 2


def test_overlap_class_weight_matches_reference():
    ys = ref.random_labels(3, 9, 7, 6)
    yt = ref.random_labels(3, 5, 11, 6)
    for size in [(3, 4), (9, 7), (5, 11), (2, 2)]:
        got = overlap_class_weight(ys, yt, 6, size=size)
        assert got.shape == (3, 6) and got.is_floating_point()
        _close(got, ref.overlap_class_weight(ys, yt, 6, size))


def test_contrastive_with_map_prototypes_end_to_end_gradients():
    # typical use: prototypes from masked_average_pool of the other domain, gradients into both features
    fs, _, ys = _inputs()
    ft, _, yt = _inputs()
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    protos, counts = masked_average_pool(fs, ys, K)
    loss = fcl_loss(ft, protos, yt, valid=counts > 0)
    loss.backward()
    assert fs.grad.abs().sum() > 0 and ft.grad.abs().sum() > 0
    exp_p, exp_c = ref.masked_average_pool(fs, ys, K)
    _close(loss, ref.contrastive_loss(ft, exp_p, yt, valid=exp_c > 0))


def test_cosine_logits_have_no_feature_channel_temporary():
    b_n, k_n, dim, grid = 2, 8, 16, (16, 16)
    feats = torch.randn(b_n, dim, *grid, requires_grad=True)
    protos = torch.randn(b_n, k_n, dim, requires_grad=True)
    labels = ref.random_labels(b_n, *grid, k_n)
    with ref.LargestFloatProbe() as probe:
        pixel_prototype_contrastive_loss(feats, protos, labels).backward()
    assert probe.largest < b_n * k_n * dim * grid[0] * grid[1] // 4  # no (B, K, D, h, w)


def test_no_hard_coded_sizes():
    # K = 23, D = 300 (> 256 channels), B = 3, odd grids: nothing specialised to 19 / 256 / batch 2
    feats, protos, labels = _inputs(b_n=3, k_n=23, dim=300, grid=(3, 5), label=(7, 4))
    valid = torch.rand(3, 23) > 0.3
    for at in ("feature", "label"):
        got = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, at=at, reduction="none")
        _close(got, ref.contrastive_loss(feats, protos, labels, valid=valid, at=at, reduction="none"))


def test_half_inputs_use_fp32_norms_and_sums():
    # fp16 features of magnitude ~1e3: squared norms (~1e6) overflow fp16, and a sum over 65536 pixels of a
    # loss ~1.5 exceeds fp16's max (65504); norms and reductions in fp32 keep both finite and equal to fp32
    feats = torch.randn(1, 3, 256, 256)
    protos = torch.randn(1, 4, 3)
    labels = torch.randint(0, 4, (1, 256, 256))
    half = (1000 * feats).half()
    for reduction in ("sum", "mean"):
        got = pixel_prototype_contrastive_loss(half, protos.half(), labels, reduction=reduction)
        expected = pixel_prototype_contrastive_loss(
            half.float(), protos.half().float(), labels, reduction=reduction
        )
        assert torch.isfinite(got), reduction
        torch.testing.assert_close(got.float(), expected, rtol=1e-3, atol=1e-3)


def test_eps_floors_the_norms():
    # cos = a.b / (max(|a|, eps) max(|b|, eps)): pixels with |f| < eps get a shrunk cosine (not F.normalize's)
    feats, protos, labels = _inputs(grid=(4, 4), label=(4, 4))
    feats[:, :, 0] *= 1e-8  # first row of every image: norms ~1e-8 < eps = 1e-6
    protos[0, 1] *= 1e-9  # one prototype below eps too
    for eps in (1e-6, 1e-3):
        got = pixel_prototype_contrastive_loss(feats, protos, labels, eps=eps, reduction="none")
        _close(got, ref.contrastive_loss(feats, protos, labels, eps=eps, reduction="none"))


# ------------------------------------------------------------------------------------------------ issue 18


def _absent_case(seed=0):
    r"""The issue's case: source images that hold only some classes (masked_average_pool gives the absent ones
    zero prototypes), target pixels of every class."""
    g = torch.Generator().manual_seed(seed)
    f_s = torch.randn(B, D, *GRID, dtype=torch.float64, generator=g)
    f_t = torch.randn(B, D, *GRID, dtype=torch.float64, generator=g)
    y_s = torch.randint(0, 3, (B, *LABEL), generator=g)  # classes 3 and 4 absent from the source
    y_s[1] = torch.where(y_s[1] == 1, 0, y_s[1])  # and class 1 from image 1
    y_t = torch.randint(0, K, (B, *LABEL), generator=g)
    return f_s, f_t, y_s, y_t


@pytest.mark.parametrize("at", ["feature", "label"])
@pytest.mark.parametrize("loss_fn", [fcl_loss, bcl_loss, pixel_prototype_contrastive_loss])
def test_pooled_prototypes_without_valid_mask_absent_classes(loss_fn, at):
    # issue 18.1: the natural call fcl_loss(f_t, p_s, y_t) used to treat zero prototypes as real ones
    f_s, f_t, y_s, y_t = _absent_case()
    pooled = masked_average_pool(f_s, y_s, K)
    p_ref, n_ref = ref.masked_average_pool(f_s, y_s, K)
    expected = ref.contrastive_loss(f_t, p_ref, y_t, valid=np.asarray(n_ref) > 0, at=at)
    wrong = ref.contrastive_loss(f_t, p_ref, y_t, valid=np.ones((B, K), dtype=bool), at=at)
    assert abs(expected - wrong) > 1e-2 * abs(expected)  # the case tells the two apart
    _close(loss_fn(f_t, pooled, y_t, at=at), expected)  # the PooledPrototypes as it comes
    _close(loss_fn(f_t, pooled.prototypes, y_t, at=at), expected)  # a bare tensor: zero rows are absent
    _close(loss_fn(f_t, pooled.prototypes, y_t, valid=pooled.counts > 0, at=at), expected)


def test_pooled_prototypes_shared_and_module_and_dynamic_labels():
    f_s, f_t, y_s, y_t = _absent_case(1)
    pooled = masked_average_pool(f_s, y_s, K, per_image=False)  # (K, D), (K,)
    assert pooled.counts[3] == 0
    expected = fcl_loss(f_t, pooled.prototypes, y_t, valid=pooled.counts > 0)
    _close(fcl_loss(f_t, pooled, y_t), expected.item())
    _close(PixelPrototypeContrastiveLoss()(f_t, pooled, y_t), expected.item())
    from protocl import dynamic_pseudo_label

    got = dynamic_pseudo_label(f_t, masked_average_pool(f_s, y_s, K), threshold=-1.0)
    assert not torch.any((got == 3) | (got == 4))  # absent classes are never the arg max
    assert torch.equal(got, dynamic_pseudo_label(f_t, masked_average_pool(f_s, y_s, K).prototypes, threshold=-1.0))


def test_pooled_prototypes_with_valid_is_refused():
    f_s, f_t, y_s, y_t = _absent_case()
    pooled = masked_average_pool(f_s, y_s, K)
    with pytest.raises(ValueError, match=r"valid: expected None when source_prototypes is a PooledPrototypes"):
        fcl_loss(f_t, pooled, y_t, valid=pooled.counts > 0)


def _pixel_weights(kind, gen, b_n=B, grid=GRID, label=LABEL):
    if kind == "image":
        return torch.rand(b_n, generator=gen, dtype=torch.float64) + 0.5
    shape = grid if kind == "feature" else label
    w = torch.rand(b_n, *shape, generator=gen, dtype=torch.float64)
    w[0, 0, 0] = 0.0
    return w[:, None] if kind == "label4d" else w


@pytest.mark.parametrize("kind", ["image", "feature", "label", "label4d"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(("absent", "at"), [("mask", "feature"), ("mask", "label"), ("min_similarity", "label")])
def test_pixel_weight_matches_reference(kind, reduction, absent, at):
    # issue 18.6: a per-pixel (or per-image) weight, "mean" = sum w l / sum w as F.cross_entropy's weighted mean
    gen = torch.Generator().manual_seed(3)
    feats, protos, labels = _inputs()
    valid = torch.rand(B, K, generator=gen) > 0.3
    cw = torch.rand(K, generator=gen, dtype=torch.float64) + 0.1
    pw = _pixel_weights(kind, gen)
    got = pixel_prototype_contrastive_loss(
        feats, protos, labels, valid=valid, class_weight=cw, pixel_weight=pw, absent=absent, at=at,
        reduction=reduction,
    )
    expected = ref.contrastive_loss(
        feats, protos, labels, valid=valid, class_weight=cw, pixel_weight=pw, absent=absent, at=at,
        reduction=reduction,
    )
    _close(got, expected)


def test_pixel_weight_mean_is_cross_entropys_weighted_mean():
    # an oracle nobody here wrote: F.cross_entropy on the nearest-upsampled logits, weights folded in by hand
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(4)
    feats, protos, labels = _inputs()
    labels[0, :2] = 255
    pw = torch.rand(B, *LABEL, generator=gen, dtype=torch.float64)
    logits = F.interpolate(cosine_similarity_map(feats, protos) / 0.1, size=LABEL, mode="nearest")
    ce = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    keep = (labels != 255).double() * pw
    expected = (ce * keep).sum() / keep.sum()
    got = pixel_prototype_contrastive_loss(feats, protos, labels, pixel_weight=pw, at="label", absent="min_similarity")
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)
    # a constant weight cancels out of "mean" (documented) and scales "sum"
    base = pixel_prototype_contrastive_loss(feats, protos, labels, at="label")
    half = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", pixel_weight=torch.full((B,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(half, base, rtol=1e-12, atol=0.0)
    s = pixel_prototype_contrastive_loss(feats, protos, labels, at="label", reduction="sum")
    s_half = pixel_prototype_contrastive_loss(
        feats, protos, labels, at="label", reduction="sum", pixel_weight=torch.full((B,), 0.5, dtype=torch.float64)
    )
    torch.testing.assert_close(s_half, 0.5 * s, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("at", ["feature", "label"])
def test_pixel_weight_all_zero_is_a_connected_zero(at):
    feats, protos, labels = _inputs()
    feats.requires_grad_(True)
    loss = fcl_loss(feats, protos, labels, pixel_weight=torch.zeros(B, *LABEL, dtype=torch.float64), at=at)
    assert loss.item() == 0.0 and loss.requires_grad
    (grad,) = torch.autograd.grad(loss, feats)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("kind", ["image", "feature", "label"])
@pytest.mark.parametrize("at", ["feature", "label"])
def test_pixel_weight_gradcheck(kind, at):
    gen = torch.Generator().manual_seed(5)
    feats, protos, labels = _inputs()
    feats.requires_grad_(True)
    protos.requires_grad_(True)
    pw = _pixel_weights(kind, gen)

    def fn(f, p):
        return pixel_prototype_contrastive_loss(f, p, labels, pixel_weight=pw, at=at, absent="min_similarity")

    assert torch.autograd.gradcheck(fn, (feats, protos), fast_mode=True)


def test_pixel_weight_validation():
    feats, protos, labels = _inputs()
    with pytest.raises(ValueError, match=r"pixel_weight: expected shape \(2, 3, 4\) \(feature grid\)"):
        fcl_loss(feats, protos, labels, pixel_weight=torch.rand(B, 5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"pixel_weight: expected shape \(2,\) \(one weight per image\)"):
        fcl_loss(feats, protos, labels, pixel_weight=torch.rand(3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"pixel_weight: expected non-negative weights"):
        fcl_loss(feats, protos, labels, pixel_weight=-torch.ones(B, dtype=torch.float64))


def test_class_weight_column_as_dass_builds_it():
    # issue 18.8: DASS's CrossEntropyLoss weight is a (K, 1) column; it means the (K,) vector
    feats, protos, labels = _inputs()
    w = torch.rand(K, dtype=torch.float64)
    for at in ("feature", "label"):
        expected = fcl_loss(feats, protos, labels, class_weight=w, at=at)
        torch.testing.assert_close(fcl_loss(feats, protos, labels, class_weight=w[:, None], at=at), expected)
    with pytest.raises(ValueError, match=r"class_weight: expected shape \(5,\) .*a column \(5, 1\) is accepted"):
        fcl_loss(feats, protos, labels, class_weight=torch.rand(1, K, 2, dtype=torch.float64)[0])
