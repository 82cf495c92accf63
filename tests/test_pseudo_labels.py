r"""Dynamic, hybrid and static pseudo labels and class-balanced thresholds (spec section 3)."""

import copy
import math

import numpy as np
import pytest
import reference as ref
import torch

from protocl import ClassBalancedThresholds, dynamic_pseudo_label, hybrid_fuse, static_pseudo_label

B, K, D = 2, 5, 3


def _eq(got, expected):
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), torch.from_numpy(np.asarray(expected)))


def _aligned_features(b_n, dim, grid, protos, noise=0.3):
    r"""Features near random prototypes so that a good share of cosines exceed the thresholds."""
    k_n = protos.shape[-2]
    pick = torch.randint(k_n, (b_n, *grid))
    rows = protos[pick] if protos.ndim == 2 else protos[torch.arange(b_n)[:, None, None], pick]
    return (rows + noise * torch.randn(b_n, *grid, dim, dtype=protos.dtype)).permute(0, 3, 1, 2)


# ------------------------------------------------------------------------------------------- dynamic
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("layout", ["shared", "batch"])
def test_dynamic_matches_reference(threshold, layout, device):
    protos = (
        torch.randn(K, D, dtype=torch.float64)
        if layout == "shared"
        else torch.randn(B, K, D, dtype=torch.float64)
    )
    feats = _aligned_features(B, D, (4, 5), protos)
    for valid in (None, torch.tensor([True, False, True, True, False]), torch.rand(B, K) > 0.4):
        for size in (None, (9, 11), (4, 5), (3, 2)):
            got = dynamic_pseudo_label(
                feats.to(device),
                protos.to(device),
                threshold=threshold,
                size=size,
                valid=None if valid is None else valid.to(device),
            )
            _eq(got, ref.dynamic_pseudo_label(feats, protos, valid=valid, threshold=threshold, size=size))


def test_dynamic_uses_class_zero_and_custom_ignore():
    protos = torch.eye(3, 4)
    feats = torch.zeros(1, 4, 1, 3)
    feats[0, 0, 0, 0] = 1.0  # class 0 exactly
    feats[0, 1, 0, 1] = 1.0  # class 1 exactly
    feats[0, 3, 0, 2] = 1.0  # orthogonal to everything
    assert dynamic_pseudo_label(feats, protos, threshold=0.7, ignore_index=-1).tolist() == [[[0, 1, -1]]]


def test_dynamic_threshold_is_strict_and_on_cosine():
    protos = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    feats = torch.tensor([[[[3.0]], [[4.0]]]], dtype=torch.float64)  # cos = 0.6 whatever the norm 5
    assert dynamic_pseudo_label(feats, protos, threshold=0.59).item() == 0
    assert dynamic_pseudo_label(feats, protos, threshold=0.61).item() == 255


def test_dynamic_no_valid_prototype_gives_ignore():
    protos = torch.randn(K, D)
    feats = _aligned_features(B, D, (3, 3), protos)
    got = dynamic_pseudo_label(feats, protos, threshold=-1.0, valid=torch.zeros(K, dtype=torch.bool))
    assert torch.all(got == 255)


def test_dynamic_is_not_differentiable():
    protos = torch.randn(K, D, requires_grad=True)
    feats = torch.randn(B, D, 3, 3, requires_grad=True)
    got = dynamic_pseudo_label(feats, protos, threshold=0.0)
    assert not got.requires_grad and got.dtype == torch.int64


def test_dynamic_half_features_match_fp32():
    protos = torch.randn(K, D)
    feats = _aligned_features(B, D, (6, 6), protos, noise=0.05).to(torch.bfloat16)
    got = dynamic_pseudo_label(feats, protos.to(torch.bfloat16), threshold=0.5)
    expected = dynamic_pseudo_label(feats.float(), protos.to(torch.bfloat16).float(), threshold=0.5)
    assert (got == expected).float().mean() > 0.97  # only pixels at the threshold may flip


# -------------------------------------------------------------------------------------------- hybrid
@pytest.mark.parametrize("mode", ["fill", "agree", "dynamic_first"])
@pytest.mark.parametrize("dyn_size", [(7, 9), (3, 4), (10, 13)])
def test_fuse_matches_reference(mode, dyn_size, device):
    static = ref.random_labels(B, 7, 9, K, ignore_frac=0.5).to(device)
    dynamic = ref.random_labels(B, *dyn_size, K, ignore_frac=0.4).to(device)
    got = hybrid_fuse(static, dynamic, mode=mode)
    assert got.shape == static.shape
    _eq(got, ref.hybrid_fuse(static, dynamic, mode=mode))


def test_fuse_modes_by_hand():
    y_f = torch.tensor([[[0, 255, 1, 255, 2]]])
    y_d = torch.tensor([[[2, 2, 1, 255, 0]]])
    assert hybrid_fuse(y_f, y_d, mode="fill").tolist() == [[[0, 2, 1, 255, 2]]]
    assert hybrid_fuse(y_f, y_d, mode="agree").tolist() == [[[255, 255, 1, 255, 255]]]
    assert hybrid_fuse(y_f, y_d, mode="dynamic_first").tolist() == [[[2, 2, 1, 255, 0]]]


def test_fuse_custom_ignore_index():
    y_f = torch.tensor([[[0, -1, 1]]])
    y_d = torch.tensor([[[2, 2, -1]]])
    assert hybrid_fuse(y_f, y_d, ignore_index=-1).tolist() == [[[0, 2, 1]]]


# -------------------------------------------------------------------------------------------- static
def _logits(b_n=B, k_n=K, size=(6, 7), scale=2.0, dtype=torch.float64):
    return scale * torch.randn(b_n, k_n, *size, dtype=dtype)


@pytest.mark.parametrize("proportion", [0.0, 0.05, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("with_thresholds", [False, True])
def test_static_matches_reference(proportion, with_thresholds, device):
    logits = _logits()
    thr = torch.tensor([0.9, 0.5, 2.0, 0.3, 0.7], dtype=torch.float64) if with_thresholds else None
    got = static_pseudo_label(
        logits.to(device), class_thresholds=None if thr is None else thr.to(device), proportion=proportion
    )
    _eq(got, ref.static_pseudo_label(logits, class_thresholds=thr, proportion=proportion))


def test_static_top_proportion_keeps_exactly_n_per_image():
    logits = _logits(b_n=3, size=(10, 10))
    for proportion, n in [(0.1, 10), (0.25, 25), (0.001, 1), (1.0, 100)]:
        kept = (static_pseudo_label(logits, proportion=proportion) != 255).sum((1, 2))
        assert kept.tolist() == [n] * 3


def test_static_uses_the_argmax_class_threshold_not_any_class():
    # probabilities [0.5, 0.3, 0.2]: argmax 0 misses its 0.9 threshold; classes 1, 2 have low thresholds
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)).view(1, 3, 1, 1)
    got = static_pseudo_label(
        logits, class_thresholds=torch.tensor([0.9, 0.1, 0.1], dtype=torch.float64), proportion=0.0
    )
    assert got.item() == 255
    got = static_pseudo_label(
        logits, class_thresholds=torch.tensor([0.4, 0.9, 0.9], dtype=torch.float64), proportion=0.0
    )
    assert got.item() == 0  # class 0 is a class like any other


def test_static_thresholds_probabilities_not_logits():
    logits = torch.tensor([3.0, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)  # softmax max ~0.91
    thr = torch.full((3,), 0.95, dtype=torch.float64)
    assert static_pseudo_label(logits, class_thresholds=thr, proportion=0.0).item() == 255
    thr = torch.full((3,), 0.9, dtype=torch.float64)
    assert static_pseudo_label(logits, class_thresholds=thr, proportion=0.0).item() == 0


def test_static_infinite_threshold_never_passes_and_proportion_zero_disables():
    logits = _logits()
    thr = torch.full((K,), math.inf, dtype=torch.float64)
    assert torch.all(static_pseudo_label(logits, class_thresholds=thr, proportion=0.0) == 255)
    assert torch.all(static_pseudo_label(logits, proportion=0.0) == 255)


def test_static_saturated_logits():
    logits = _logits(scale=100.0)
    got = static_pseudo_label(logits, proportion=0.3)
    _eq(got, ref.static_pseudo_label(logits, proportion=0.3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_static_half_logits(dtype):
    logits = _logits(dtype=torch.float32).to(dtype)
    thr = torch.tensor([0.9, 0.5, 0.95, 0.3, 0.7])
    got = static_pseudo_label(logits, class_thresholds=thr, proportion=0.2)
    expected = static_pseudo_label(logits.float(), class_thresholds=thr, proportion=0.2)
    assert torch.equal(got, expected)


# -------------------------------------------------------------------------------- class thresholds
def _confident_batches(n, k_n=K, size=(8, 8)):
    return [_logits(k_n=k_n, size=size, scale=1.5 + i) for i in range(n)]


@pytest.mark.parametrize("proportion", [0.01, 0.1, 0.5, 1.0])
def test_thresholds_within_1e3_of_exact(proportion):
    batches = _confident_batches(4)
    cbt = ClassBalancedThresholds(K, proportion=proportion)
    for logits in batches:
        cbt.update(logits)
    got = cbt.compute()
    exact = ref.class_balanced_thresholds(batches, K, proportion)
    assert got.shape == (K,)
    finite = np.isfinite(exact)
    assert torch.equal(torch.isfinite(got), torch.from_numpy(finite))
    assert np.max(np.abs(got.double().numpy()[finite] - exact[finite])) <= 1e-3


def _spread_logits(kind, k_n=8, shape=(4, 96, 96), dtype=torch.float32, seed=0):
    r"""``flat-S``: standard normal logits times S (uncertain classes); ``margin-M``: standard normal logits plus
    an exponential logit margin of mean M on a random class (confident classes, late training, background)."""
    g = torch.Generator().manual_seed(seed)
    name, value = kind.split("-")
    z = torch.randn(shape[0], k_n, *shape[1:], generator=g, dtype=torch.float64)
    if name == "flat":
        return (float(value) * z).to(dtype)
    cls = torch.randint(0, k_n, shape, generator=g)
    margin = torch.empty(shape, dtype=torch.float64).exponential_(1 / float(value), generator=g)
    return z.scatter_add(1, cls[:, None], (3 + margin)[:, None]).to(dtype)


SPREADS = ["flat-0.5", "flat-1", "flat-3", "margin-3", "margin-5", "margin-7", "margin-10"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("proportion", [0.1, 0.05, 0.3])
@pytest.mark.parametrize("kind", SPREADS)
def test_thresholds_pass_the_proportion_of_every_class(kind, proportion, dtype):
    # the share of each class's arg-max pixels at or above its threshold is the proportion, within 10 % of it,
    # for flat and for saturated confidences (bins uniform in c would pass ~18 % at margin-5, ~29 % at margin-7)
    logits = _spread_logits(kind, dtype=dtype)
    cbt = ClassBalancedThresholds(8, proportion=proportion)
    for chunk in logits.split(1):
        cbt.update(chunk)
    thresholds = cbt.compute()
    labels = static_pseudo_label(logits, class_thresholds=thresholds, proportion=0.0)
    # an independent confidence: float64 softmax of the logits (precise for margins below ~36)
    conf, pred = torch.softmax(logits.double(), dim=1).max(dim=1)
    for k in range(8):
        mine = pred == k
        share = (labels[mine] != 255).double().mean().item()
        assert 0.9 * proportion <= share <= 1.1 * proportion, (k, share)
        independent = (conf[mine] >= thresholds[k]).double().mean().item()
        assert abs(independent - share) <= 0.01 * proportion, (k, independent, share)


def test_thresholds_resolve_confidences_that_float32_rounds_to_one():
    # margins 18..34: a float32 softmax gives exactly 1 for every pixel, protocl's float64 confidences stay
    # distinct (up to margins of ~36, where 1 - c reaches float64's resolution)
    g = torch.Generator().manual_seed(0)
    margin = 18 + 16 * torch.rand(1, 1, 64, 64, generator=g)
    logits = torch.cat([margin, torch.zeros(1, 2, 64, 64)], dim=1)  # float32
    assert torch.all(torch.softmax(logits, 1).max(1).values == 1)
    cbt = ClassBalancedThresholds(3, proportion=0.1)
    cbt.update(logits)
    kept = static_pseudo_label(logits, class_thresholds=cbt.compute(), proportion=0.0) != 255
    assert 0.09 <= kept.double().mean().item() <= 0.11
    exact = torch.quantile(margin.double().flatten(), 0.9)  # the pixels kept are the largest margins
    assert torch.all(margin[0, 0][kept[0]] >= exact - 0.05)


def test_thresholds_never_leave_a_predicted_class_empty():
    # one tie holds the whole class: the threshold passes the tie (every pixel), not nothing
    logits = torch.zeros(1, 3, 10, 10)
    logits[:, 1] = 2.0
    cbt = ClassBalancedThresholds(3, proportion=0.1)
    cbt.update(logits)
    kept = static_pseudo_label(logits, class_thresholds=cbt.compute(), proportion=0.0)
    assert torch.all(kept == 1)


def test_thresholds_inf_for_never_predicted_class():
    logits = _logits(k_n=4)
    logits[:, 3] = -50.0  # class 3 is never the arg max
    logits[:, 0] = -50.0  # nor class 0
    cbt = ClassBalancedThresholds(4, proportion=0.2)
    cbt.update(logits)
    got = cbt.compute()
    assert math.isinf(got[0].item()) and got[0].item() > 0
    assert math.isinf(got[3].item()) and got[3].item() > 0
    assert torch.all(torch.isfinite(got[1:3]))


def test_thresholds_reset_and_state_dict():
    batches = _confident_batches(3)
    cbt = ClassBalancedThresholds(K, proportion=0.1)
    for logits in batches:
        cbt.update(logits)
    clone = ClassBalancedThresholds(K, proportion=0.1)
    clone.load_state_dict(copy.deepcopy(cbt.state_dict()))
    assert torch.equal(clone.compute(), cbt.compute())
    cbt.reset()
    with pytest.raises(RuntimeError, match=r"update\(logits\)"):  # nothing seen since reset: not +inf silently
        cbt.compute()


def test_thresholds_memory_independent_of_data_size():
    cbt = ClassBalancedThresholds(K, proportion=0.1, bins=1000)
    before = {n: t.numel() for n, t in cbt.state_dict().items()}
    assert sum(before.values()) <= K * 1000 + K + 16  # O(K * bins)
    for _ in range(3):
        cbt.update(_logits(size=(40, 40)))
    assert {n: t.numel() for n, t in cbt.state_dict().items()} == before
    assert not any(isinstance(v, list) for v in vars(cbt).values())


def test_thresholds_monotone_in_proportion():
    batches = _confident_batches(3)
    values = []
    for proportion in (0.01, 0.05, 0.2, 0.5, 0.9):
        cbt = ClassBalancedThresholds(K, proportion=proportion)
        for logits in batches:
            cbt.update(logits)
        values.append(cbt.compute())
    for hi, lo in zip(values, values[1:]):
        finite = torch.isfinite(hi)
        assert torch.all(lo[finite] <= hi[finite])


def test_thresholds_feed_static_labels():
    batches = _confident_batches(2)
    cbt = ClassBalancedThresholds(K, proportion=0.3)
    for logits in batches:
        cbt.update(logits)
    thr = cbt.compute()
    got = static_pseudo_label(batches[0], class_thresholds=thr, proportion=0.1)
    _eq(got, ref.static_pseudo_label(batches[0], class_thresholds=thr, proportion=0.1))


def test_thresholds_module_forward_equals_compute():
    cbt = ClassBalancedThresholds(K, proportion=0.2)
    cbt.update(_logits())
    assert torch.equal(cbt(), cbt.compute())


def test_non_contiguous_views():
    protos = torch.randn(K, D, dtype=torch.float64)
    feats = _aligned_features(B, D, (5, 4), protos).transpose(2, 3)  # (B, D, 4, 5) view
    assert not feats.is_contiguous()
    _eq(
        dynamic_pseudo_label(feats, protos, threshold=0.5, size=(9, 7)),
        ref.dynamic_pseudo_label(feats, protos, threshold=0.5, size=(9, 7)),
    )
    logits = _logits(size=(7, 6)).transpose(2, 3)
    _eq(static_pseudo_label(logits, proportion=0.2), ref.static_pseudo_label(logits, proportion=0.2))
    static = ref.random_labels(B, 9, 7, K, ignore_frac=0.5).transpose(1, 2)
    dynamic = ref.random_labels(B, 3, 4, K).transpose(1, 2)
    _eq(hybrid_fuse(static, dynamic), ref.hybrid_fuse(static, dynamic))


def test_float64_features_and_k_above_256():
    protos = torch.randn(300, 2, dtype=torch.float64)
    feats = _aligned_features(3, 2, (3, 5), protos, noise=0.01)
    _eq(
        dynamic_pseudo_label(feats, protos, threshold=0.9, ignore_index=-1),
        ref.dynamic_pseudo_label(feats, protos, threshold=0.9, ignore_index=-1),
    )


def test_dynamic_half_features_with_large_norms():
    protos = torch.randn(K, D)
    feats = (1000 * _aligned_features(B, D, (4, 4), protos, noise=0.05)).half()  # fp16 squared norms overflow
    got = dynamic_pseudo_label(feats, protos.half(), threshold=0.5)
    expected = dynamic_pseudo_label(feats.float(), protos.half().float(), threshold=0.5)
    assert (got == expected).float().mean() > 0.97


def test_static_confidence_is_a_probability_not_the_argmax_index():
    # argmax is class 3 with probability 0.4 < its threshold 0.5 (an index-as-confidence bug keeps it)
    probs = torch.tensor([0.2, 0.2, 0.2, 0.4], dtype=torch.float64)
    logits = probs.log().view(1, 4, 1, 1)
    thr = torch.full((4,), 0.5, dtype=torch.float64)
    assert static_pseudo_label(logits, class_thresholds=thr, proportion=0.0).item() == 255
    thr[3] = 0.39
    assert static_pseudo_label(logits, class_thresholds=thr, proportion=0.0).item() == 3
