r"""Hypothesis properties on tiny CPU shapes (spec sections 2-3): invariances the operators must have."""

import torch
from hypothesis import given
from hypothesis import strategies as st

from protocl import (
    ClassBalancedThresholds,
    PrototypeEMA,
    dynamic_pseudo_label,
    entropy_loss,
    hybrid_fuse,
    masked_average_pool,
    pixel_prototype_contrastive_loss,
    static_pseudo_label,
)

IGNORE = 255


@st.composite
def problems(draw, same_size=True):
    r"""A small random problem: features (B, D, h, w), labels, prototypes (B, K, D), valid mask; float64."""
    b_n, k_n, dim = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 3))
    h, w = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    size = (h, w) if same_size else (draw(st.integers(1, 7)), draw(st.integers(1, 7)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    feats = torch.randn(b_n, dim, h, w, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, k_n, (b_n, *size), generator=gen)
    labels[torch.rand(b_n, *size, generator=gen) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = IGNORE
    protos = torch.randn(b_n, k_n, dim, generator=gen, dtype=torch.float64)
    valid = torch.rand(b_n, k_n, generator=gen) < 0.8
    return feats, labels, protos, valid, gen


def _permute_pixels(x, perm):
    r"""Apply one flat permutation of the h*w pixels to ``x (..., h, w)``."""
    shape = x.shape
    return x.reshape(*shape[:-2], -1)[..., perm].reshape(shape)


LOSS_KW = st.fixed_dictionaries(
    {
        "absent": st.sampled_from(["mask", "min_similarity"]),
        "reduction": st.sampled_from(["mean", "sum"]),
        "temperature": st.sampled_from([0.05, 0.1, 1.0]),
    }
)


@given(problems(), LOSS_KW)
def test_map_and_loss_invariant_to_pixel_permutation(problem, kw):
    feats, labels, protos, valid, gen = problem
    perm = torch.randperm(feats.shape[-1] * feats.shape[-2], generator=gen)
    pf, pl = _permute_pixels(feats, perm), _permute_pixels(labels, perm)
    k_n = protos.shape[1]
    a, b = masked_average_pool(feats, labels, k_n), masked_average_pool(pf, pl, k_n)
    torch.testing.assert_close(a.prototypes, b.prototypes)
    torch.testing.assert_close(a.counts, b.counts)
    la = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, **kw)
    lb = pixel_prototype_contrastive_loss(pf, protos, pl, valid=valid, **kw)
    torch.testing.assert_close(la, lb)


@given(problems(), LOSS_KW)
def test_ignored_pixels_have_no_effect(problem, kw):
    feats, labels, protos, valid, gen = problem
    ignored = (labels == IGNORE)[:, None].expand_as(feats)
    noisy = torch.where(ignored, 100 * torch.randn(feats.shape, generator=gen, dtype=feats.dtype), feats)
    k_n = protos.shape[1]
    a, b = masked_average_pool(feats, labels, k_n), masked_average_pool(noisy, labels, k_n)
    torch.testing.assert_close(a.prototypes, b.prototypes)
    torch.testing.assert_close(a.counts, b.counts)
    la = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, **kw)
    lb = pixel_prototype_contrastive_loss(noisy, protos, labels, valid=valid, **kw)
    torch.testing.assert_close(la, lb)
    # ... and adding ignored pixels to a map never changes the mean of the others
    wider = torch.cat([feats, noisy], dim=-1)
    wider_labels = torch.cat([labels, torch.full_like(labels, IGNORE)], dim=-1)
    if kw["reduction"] == "mean":
        torch.testing.assert_close(
            pixel_prototype_contrastive_loss(wider, protos, wider_labels, valid=valid, **kw), la
        )


@given(
    problems(same_size=False),
    st.floats(0.01, 100.0),
    st.floats(0.01, 100.0),
    st.sampled_from(["feature", "label"]),
    st.sampled_from(["mask", "min_similarity"]),
)
def test_cosine_ops_invariant_to_positive_scaling(problem, c_f, c_p, at, absent):
    feats, labels, protos, valid, _ = problem
    a = pixel_prototype_contrastive_loss(feats, protos, labels, valid=valid, at=at, absent=absent)
    b = pixel_prototype_contrastive_loss(c_f * feats, c_p * protos, labels, valid=valid, at=at, absent=absent)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for threshold in (0.0, 0.5):
        da = dynamic_pseudo_label(feats, protos, valid=valid, threshold=threshold)
        db = dynamic_pseudo_label(c_f * feats, c_p * protos, valid=valid, threshold=threshold)
        assert torch.equal(da, db)


@given(
    problems(same_size=False),
    st.sampled_from(["feature", "label"]),
    st.sampled_from(["mask", "min_similarity"]),
)
def test_losses_are_non_negative(problem, at, absent):
    feats, labels, protos, valid, _ = problem
    per_pixel = pixel_prototype_contrastive_loss(
        feats, protos, labels, valid=valid, at=at, absent=absent, reduction="none"
    )
    assert torch.all(per_pixel >= 0)
    logits = torch.einsum("bdhw,bkd->bkhw", feats, protos) * 10
    assert torch.all(entropy_loss(logits, reduction="none") >= 0)


@given(problems(same_size=False))
def test_constant_features_give_constant_prototypes(problem):
    feats, labels, protos, _, _ = problem
    value = torch.randn(feats.shape[1], dtype=feats.dtype)
    const = value[None, :, None, None].expand_as(feats)
    out = masked_average_pool(const, labels, protos.shape[1])
    seen = out.counts > 0
    torch.testing.assert_close(out.prototypes[seen], value.expand(int(seen.sum()), -1))


@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.5, 0.9, 0.99]), st.integers(1, 6))
def test_ema_stays_in_the_convex_hull_of_what_it_saw(seed, momentum, steps):
    gen = torch.Generator().manual_seed(seed)
    k_n, dim = 3, 2
    ema = PrototypeEMA(k_n, dim, momentum=momentum)
    low = torch.full((k_n, dim), float("inf"))
    high = torch.full((k_n, dim), float("-inf"))
    for _ in range(steps):
        protos = torch.randn(k_n, dim, generator=gen) * 5
        counts = torch.randint(0, 3, (k_n,), generator=gen).float()
        ema.update_from(protos, counts)
        seen = counts > 0
        low = torch.where(seen[:, None], torch.minimum(low, protos), low)
        high = torch.where(seen[:, None], torch.maximum(high, protos), high)
    init = ema.initialized
    assert torch.equal(init, torch.isfinite(low[:, 0]))
    assert torch.all(ema.prototypes[init] >= low[init] - 1e-5)
    assert torch.all(ema.prototypes[init] <= high[init] + 1e-5)
    assert torch.all(ema.prototypes[~init] == 0)


@given(
    st.integers(0, 2**31 - 1),
    st.sampled_from(["fill", "agree", "dynamic_first"]),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_fuse_is_idempotent(seed, mode, h, w):
    gen = torch.Generator().manual_seed(seed)
    static = torch.randint(0, 4, (2, 6, 5), generator=gen)
    static[torch.rand(static.shape, generator=gen) < 0.4] = IGNORE
    dynamic = torch.randint(0, 4, (2, h, w), generator=gen)
    dynamic[torch.rand(dynamic.shape, generator=gen) < 0.4] = IGNORE
    once = hybrid_fuse(static, dynamic, mode=mode)
    assert torch.equal(hybrid_fuse(once, dynamic, mode=mode), once)
    assert torch.equal(hybrid_fuse(static, static, mode=mode), static)


@given(st.integers(0, 2**31 - 1), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_thresholds_and_static_labels_monotone_in_proportion(seed, p1, p2):
    lo, hi = sorted((p1, p2))
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(2, 4, 6, 6, generator=gen)
    t_lo, t_hi = ClassBalancedThresholds(4, proportion=lo), ClassBalancedThresholds(4, proportion=hi)
    t_lo.update(logits)
    t_hi.update(logits)
    a, b = t_lo.compute(), t_hi.compute()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    finite = torch.isfinite(a)
    assert torch.all(b[finite] <= a[finite])  # a larger proportion never raises a threshold
    kept_lo = static_pseudo_label(logits, proportion=lo) != IGNORE
    kept_hi = static_pseudo_label(logits, proportion=hi) != IGNORE
    assert torch.all(kept_hi | ~kept_lo)  # every pixel kept at the smaller proportion is kept at the larger
