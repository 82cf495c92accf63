r"""Release compatibility (spec section 6): protocl's release-compatible setting reproduces the authors'
per-pair loss values.

:func:`release_batch_loss` re-implements the authors' procedure as the spec describes it, one (source image,
target image) pair at a time, with the tensor ops their code uses (``F.interpolate`` on float label maps,
``F.normalize``, a dense cosine, ``F.cross_entropy`` with ``weight`` and ``ignore_index``). It runs in the
dtype of its inputs: float32 mirrors the release bit for bit; in float64 every ``F.interpolate`` reads its
rows in float32 (the rule of the float32 release run and of protocl; float64 ``F.interpolate`` would pick
other rows for sizes like 92 -> 730).
"""

import pytest
import reference as ref
import torch
import torch.nn.functional as F

from protocl import (
    BidirectionalContrast,
    masked_average_pool,
    overlap_class_weight,
    pixel_prototype_contrastive_loss,
)

IGNORE = 255


def _nearest(x, size):
    r"""``F.interpolate(x, size, mode="nearest")`` on a float ``(N, C, H, W)`` tensor, float32 rows."""
    if x.dtype == torch.float32:
        return F.interpolate(x, size=size, mode="nearest")
    rows = torch.tensor(ref.nearest_index(size[0], x.shape[2]))
    cols = torch.tensor(ref.nearest_index(size[1], x.shape[3]))
    return x.index_select(2, rows).index_select(3, cols)


def _release_prototypes(feat, small_labels, num_classes):
    r"""Per-image prototypes of the classes present in ``small_labels (h, w)``; absent classes stay zero."""
    protos = torch.zeros(num_classes, feat.shape[0], dtype=feat.dtype)
    for k in range(num_classes):
        mask = small_labels == k
        if mask.any():
            protos[k] = feat[:, mask].mean(dim=1)
    return protos


def _release_logits(feat, protos, label_size):
    r"""Cosine of normalised features and prototypes, exact zeros -> -1, x10, nearest-upsampled."""
    f = F.normalize(feat, dim=0)  # d h w
    p = F.normalize(protos, dim=1)  # k d
    cos = torch.einsum("dhw,kd->khw", f, p)
    cos = torch.where(cos == 0, torch.full_like(cos, -1.0), cos)
    return _nearest((cos * 10)[None], label_size)  # 1 k H W


def release_pair_losses(f_s, y_s, f_t, y_t, num_classes):
    r"""FCL and BCL of every pair, as lists of 0-d tensors."""
    fcl, bcl = [], []
    for b in range(f_s.shape[0]):
        ys_small = _nearest(y_s[b][None, None].to(f_s.dtype), f_s.shape[-2:])[0, 0].long()
        yt_small = _nearest(y_t[b][None, None].to(f_t.dtype), f_t.shape[-2:])[0, 0].long()
        proto_s = _release_prototypes(f_s[b], ys_small, num_classes)
        proto_t = _release_prototypes(f_t[b], yt_small, num_classes)
        weight = torch.tensor(
            [float(bool((ys_small == k).any() and (yt_small == k).any())) for k in range(num_classes)],
            dtype=f_t.dtype,
        )
        fcl.append(
            F.cross_entropy(
                _release_logits(f_t[b], proto_s, y_t.shape[-2:]),
                y_t[b][None],
                weight=weight,
                ignore_index=IGNORE,
            )
        )
        bcl.append(
            F.cross_entropy(
                _release_logits(f_s[b], proto_t, y_s.shape[-2:]), y_s[b][None], ignore_index=IGNORE
            )
        )
    return fcl, bcl


def release_batch_loss(f_s, y_s, f_t, y_t, num_classes, fcl_weight, bcl_weight):
    r"""The batch loss: the mean over the pairs of ``fcl_weight * FCL + bcl_weight * BCL``."""
    fcl, bcl = release_pair_losses(f_s, y_s, f_t, y_t, num_classes)
    return sum(fcl_weight * a + bcl_weight * b for a, b in zip(fcl, bcl)) / f_s.shape[0]


def _pair_batch(
    dtype, b_n=2, k_n=19, dim=8, grid_s=(9, 11), grid_t=(9, 11), label_s=(65, 81), label_t=(65, 81)
):
    f_s = torch.randn(b_n, dim, *grid_s, dtype=dtype)
    f_t = torch.randn(b_n, dim, *grid_t, dtype=dtype)
    y_s = ref.blocky_labels(b_n, *label_s, k_n, block=7, ignore_frac=0.1)
    y_t = ref.blocky_labels(b_n, *label_t, k_n, block=7, ignore_frac=0.4)
    return f_s, y_s, f_t, y_t


def _protocl_pair_losses(f_s, y_s, f_t, y_t, num_classes):
    r"""protocl's release-compatible setting, one pair at a time."""
    fcl, bcl = [], []
    for b in range(f_s.shape[0]):
        pair = slice(b, b + 1)
        p_s, n_s = masked_average_pool(f_s[pair], y_s[pair], num_classes)
        p_t, n_t = masked_average_pool(f_t[pair], y_t[pair], num_classes)
        weight = overlap_class_weight(
            y_s[pair], y_s[pair], num_classes, size=tuple(f_s.shape[-2:])
        ) * overlap_class_weight(y_t[pair], y_t[pair], num_classes, size=tuple(f_t.shape[-2:]))
        kw = {"absent": "min_similarity", "at": "label", "temperature": 0.1}
        fcl.append(
            pixel_prototype_contrastive_loss(
                f_t[pair], p_s, y_t[pair], valid=n_s > 0, class_weight=weight.to(f_t.dtype), **kw
            )
        )
        bcl.append(pixel_prototype_contrastive_loss(f_s[pair], p_t, y_s[pair], valid=n_t > 0, **kw))
    return fcl, bcl


SIZES = [
    {},  # 9x11 features, 65x81 labels: non-integer ratios
    {"grid_s": (8, 8), "grid_t": (8, 8), "label_s": (64, 64), "label_t": (64, 64)},  # integer ratio 8
    {"grid_s": (7, 10), "grid_t": (11, 6), "label_s": (50, 73), "label_t": (41, 45)},  # both domains differ
    {
        "grid_s": (92, 5),
        "grid_t": (92, 5),
        "label_s": (730, 41),
        "label_t": (730, 41),
    },  # float32 rule != integer floor
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "x".join(map(str, s.get("label_s", (65, 81)))))
def test_functional_release_setting_matches_release_per_pair(dtype, sizes):
    f_s, y_s, f_t, y_t = _pair_batch(dtype, **sizes)
    exp_f, exp_b = release_pair_losses(f_s, y_s, f_t, y_t, 19)
    got_f, got_b = _protocl_pair_losses(f_s, y_s, f_t, y_t, 19)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    for got, expected in zip(got_f + got_b, exp_f + exp_b):
        assert torch.isfinite(expected)  # every pair overlaps in these batches
        torch.testing.assert_close(got, expected, **tol)


def test_functional_release_setting_gradients_match():
    f_s, y_s, f_t, y_t = _pair_batch(torch.float64)
    leaves = [f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)]
    fcl, bcl = release_pair_losses(leaves[0], y_s, leaves[1], y_t, 19)
    expected = torch.autograd.grad(sum(0.1 * a + 0.1 * b for a, b in zip(fcl, bcl)) / 2, leaves)
    mine = [f_s.clone().requires_grad_(True), f_t.clone().requires_grad_(True)]
    fcl, bcl = _protocl_pair_losses(mine[0], y_s, mine[1], y_t, 19)
    got = torch.autograd.grad(sum(0.1 * a + 0.1 * b for a, b in zip(fcl, bcl)) / 2, mine)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sizes", SIZES[:3], ids=["non_integer", "integer", "two_grids"])
def test_orchestrator_release_mode_matches_release_batch_loss(dtype, sizes):
    # static labels without dynamic fusion: the release loop sees exactly the labels the orchestrator uses
    f_s, y_s, f_t, y_t = _pair_batch(dtype, **sizes)
    model = BidirectionalContrast(
        19, 8, release_compatible=True, dynamic=False, fcl_weight=0.3, bcl_weight=0.7
    )
    out = model(f_s, y_s, f_t, y_t)
    expected = release_batch_loss(f_s, y_s, f_t, y_t, 19, 0.3, 0.7)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(out.loss, expected, **tol)
    exp_f, exp_b = release_pair_losses(f_s, y_s, f_t, y_t, 19)
    torch.testing.assert_close(out.fcl, sum(exp_f) / 2, **tol)
    torch.testing.assert_close(out.bcl, sum(exp_b) / 2, **tol)


def test_orchestrator_release_mode_with_hybrid_labels():
    # with dynamic labels on, the release loop is fed the hybrid labels the orchestrator returns
    f_s, y_s, f_t, y_t = _pair_batch(torch.float64)
    model = BidirectionalContrast(19, 8, release_compatible=True, threshold=0.2)
    out = model(f_s, y_s, f_t, y_t)
    assert torch.any(out.target_labels != y_t)  # fusion did something
    expected = release_batch_loss(f_s, y_s, f_t, out.target_labels, 19, 0.1, 0.1)
    torch.testing.assert_close(out.loss, expected, rtol=1e-10, atol=1e-12)


def test_release_procedure_is_what_the_reference_computes():
    # two independent write-ups of the same procedure (torch ops vs plain loops) agree
    f_s, f_t = torch.randn(1, 3, 3, 4, dtype=torch.float64), torch.randn(1, 3, 3, 4, dtype=torch.float64)
    y_s = ref.random_labels(1, 7, 9, 6, present=[0, 1, 2, 4])
    y_t = ref.random_labels(1, 7, 9, 6, present=[1, 2, 3, 5])
    exp_f, exp_b = release_pair_losses(f_s, y_s, f_t, y_t, 6)
    p_s, n_s = ref.masked_average_pool(f_s, y_s, 6)
    p_t, n_t = ref.masked_average_pool(f_t, y_t, 6)
    weight = ref.overlap_class_weight(y_s, y_t, 6, (3, 4))
    fcl = ref.contrastive_loss(
        f_t, p_s, y_t, valid=n_s > 0, class_weight=weight, absent="min_similarity", at="label"
    )
    bcl = ref.contrastive_loss(f_s, p_t, y_s, valid=n_t > 0, absent="min_similarity", at="label")
    assert abs(fcl - exp_f[0].item()) < 1e-10 and abs(bcl - exp_b[0].item()) < 1e-10


def test_pair_without_overlap_counts_zero_instead_of_nan():
    # the release's F.cross_entropy gives NaN for a pair whose classes do not overlap (all FCL weights 0);
    # protocl's empty mean is 0 (spec section 2), and the pair still counts in the mean over pairs
    f_s, y_s, f_t, y_t = _pair_batch(torch.float64)
    y_s[0] = torch.where(y_s[0] == 255, 255, 0)  # pair 0: source has class 0 only ...
    y_t[0] = torch.where(y_t[0] == 255, 255, 1)  # ... target class 1 only
    exp_f, exp_b = release_pair_losses(f_s, y_s, f_t, y_t, 19)
    assert torch.isnan(exp_f[0]) and torch.isfinite(exp_f[1])
    model = BidirectionalContrast(19, 8, release_compatible=True, dynamic=False)
    out = model(f_s, y_s, f_t, y_t)
    torch.testing.assert_close(out.fcl, exp_f[1] / 2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.bcl, (exp_b[0] + exp_b[1]) / 2, rtol=1e-10, atol=1e-12)
