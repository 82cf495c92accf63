r"""Malformed calls raise ValueError/TypeError naming the argument (spec section 2); value-check switch."""

import inspect
import re

import numpy as np
import pytest
import torch

import protocl
from protocl import _validation  # the deferral's CPU rehearsal switch and the label-map view (issue 18)
from protocl import (
    BidirectionalContrast,
    ClassBalancedThresholds,
    EntropyLoss,
    PixelPrototypeContrastiveLoss,
    PrototypeEMA,
    bcl_loss,
    cosine_similarity_map,
    domain_bias_calibrate,
    dynamic_pseudo_label,
    entropy_loss,
    fcl_loss,
    hybrid_fuse,
    label_histogram,
    masked_average_pool,
    overlap_class_weight,
    pixel_prototype_contrastive_loss,
    resize_labels,
    static_pseudo_label,
)

B, K, D = 2, 5, 3
F4 = torch.randn(B, D, 4, 4)
Y = torch.randint(0, K, (B, 8, 8))
P = torch.randn(B, K, D)
Z = torch.randn(B, K, 8, 8)


def _ema():
    return PrototypeEMA(K, D)


def _step():
    return BidirectionalContrast(K, D)


# (argument the message must name, call)
MALFORMED = [
    # masked_average_pool
    ("features", lambda: masked_average_pool(torch.randn(D, 4, 4), Y, K)),
    ("features", lambda: masked_average_pool(F4.numpy(), Y, K)),
    ("features", lambda: masked_average_pool(F4.long(), Y, K)),
    ("labels", lambda: masked_average_pool(F4, Y.float(), K)),
    ("labels", lambda: masked_average_pool(F4, Y[:1], K)),
    ("labels", lambda: masked_average_pool(F4, torch.stack([Y, Y], 1), K)),  # (B, 2, H, W): not a label map
    ("num_classes", lambda: masked_average_pool(F4, Y, 0)),
    ("resize", lambda: masked_average_pool(F4, Y, K, resize="bilinear")),
    ("weights", lambda: masked_average_pool(F4, Y, K, weights=torch.rand(B, 3, 3))),
    ("per_image", lambda: masked_average_pool(F4, Y, K, per_image="yes")),
    ("min_purity", lambda: masked_average_pool(F4, Y, K, resize="purity", min_purity=1.5)),
    # contrastive loss
    ("temperature", lambda: pixel_prototype_contrastive_loss(F4, P, Y, temperature=0.0)),
    ("temperature", lambda: pixel_prototype_contrastive_loss(F4, P, Y, temperature=-0.1)),
    ("temperature", lambda: pixel_prototype_contrastive_loss(F4, P, Y, temperature="0.1")),
    ("absent", lambda: pixel_prototype_contrastive_loss(F4, P, Y, absent="zero")),
    ("at", lambda: pixel_prototype_contrastive_loss(F4, P, Y, at="pixel")),
    ("reduction", lambda: pixel_prototype_contrastive_loss(F4, P, Y, reduction="avg")),
    ("reduction", lambda: pixel_prototype_contrastive_loss(F4, P, Y, reduction=None)),
    ("prototypes", lambda: pixel_prototype_contrastive_loss(F4, torch.randn(B, K, D + 1), Y)),
    ("prototypes", lambda: pixel_prototype_contrastive_loss(F4, torch.randn(B + 1, K, D), Y)),
    ("prototypes", lambda: pixel_prototype_contrastive_loss(F4, torch.randn(D), Y)),
    ("valid", lambda: pixel_prototype_contrastive_loss(F4, P, Y, valid=torch.ones(K + 1, dtype=torch.bool))),
    ("valid", lambda: pixel_prototype_contrastive_loss(F4, P, Y, valid=torch.ones(B, K))),
    ("class_weight", lambda: pixel_prototype_contrastive_loss(F4, P, Y, class_weight=torch.ones(K - 1))),
    ("class_weight", lambda: pixel_prototype_contrastive_loss(F4, P, Y, class_weight=torch.ones(B, K, 1))),
    ("labels", lambda: pixel_prototype_contrastive_loss(F4, P, torch.stack([Y, Y], 1))),
    ("labels", lambda: pixel_prototype_contrastive_loss(F4, P, torch.full((B, 8, 8), K))),
    ("labels", lambda: pixel_prototype_contrastive_loss(F4, P, torch.full((B, 8, 8), -3))),
    ("labels", lambda: pixel_prototype_contrastive_loss(F4, P, Y[:1])),
    ("features", lambda: pixel_prototype_contrastive_loss(F4[0], P, Y)),
    ("target_features", lambda: fcl_loss(F4[0], P, Y)),
    ("source_labels", lambda: bcl_loss(F4, P, Y.float())),
    ("temperature", lambda: PixelPrototypeContrastiveLoss(temperature=0)),
    ("reduction", lambda: PixelPrototypeContrastiveLoss(reduction="batchwise_mean")),
    ("target_labels", lambda: overlap_class_weight(Y, Y[:1], K, size=(4, 4))),
    ("size", lambda: overlap_class_weight(Y, Y, K, size=(0, 4))),
    # PrototypeEMA
    ("momentum", lambda: PrototypeEMA(K, D, momentum=1.0)),
    ("momentum", lambda: PrototypeEMA(K, D, momentum=-0.1)),
    ("dim", lambda: PrototypeEMA(K, 0)),
    ("num_classes", lambda: PrototypeEMA(0, D)),
    ("features", lambda: _ema().update(torch.randn(B, D + 1, 4, 4), Y)),
    ("labels", lambda: _ema().update(F4, Y.float())),
    ("counts", lambda: _ema().update_from(torch.randn(B, K, D), torch.ones(B, K + 1))),
    ("prototypes", lambda: _ema().update_from(torch.randn(B, K + 1, D), torch.ones(B, K + 1))),
    # calibration
    ("source_ema", lambda: domain_bias_calibrate(P, torch.randn(K + 1, D), torch.randn(K, D))),
    ("target_ema", lambda: domain_bias_calibrate(P, torch.randn(K, D), torch.randn(K, D + 1))),
    (
        "source_initialized",
        lambda: domain_bias_calibrate(
            P, torch.randn(K, D), torch.randn(K, D), source_initialized=torch.ones(K + 1, dtype=torch.bool)
        ),
    ),
    (
        "source_prototypes",
        lambda: domain_bias_calibrate(torch.randn(D), torch.randn(K, D), torch.randn(K, D)),
    ),
    # dynamic / hybrid / static pseudo labels
    ("threshold", lambda: dynamic_pseudo_label(F4, P, threshold=1.5)),
    ("threshold", lambda: dynamic_pseudo_label(F4, P, threshold=-1.01)),
    ("prototypes", lambda: dynamic_pseudo_label(F4, torch.randn(K, D + 2))),
    ("target_features", lambda: dynamic_pseudo_label(F4.long(), P)),
    ("valid", lambda: dynamic_pseudo_label(F4, P, valid=torch.ones(3, K, dtype=torch.bool))),
    ("size", lambda: dynamic_pseudo_label(F4, P, size=(8,))),
    ("mode", lambda: hybrid_fuse(Y, Y, mode="union")),
    ("dynamic_labels", lambda: hybrid_fuse(Y, Y[:1])),
    ("static_labels", lambda: hybrid_fuse(Y.float(), Y)),
    ("proportion", lambda: static_pseudo_label(Z, proportion=1.5)),
    ("proportion", lambda: static_pseudo_label(Z, proportion=-0.1)),
    ("class_thresholds", lambda: static_pseudo_label(Z, class_thresholds=torch.ones(K + 1))),
    ("logits", lambda: static_pseudo_label(Z[0])),
    ("proportion", lambda: ClassBalancedThresholds(K, proportion=2.0)),
    ("bins", lambda: ClassBalancedThresholds(K, bins=0)),
    ("num_classes", lambda: ClassBalancedThresholds(0)),
    ("logits", lambda: ClassBalancedThresholds(K).update(torch.randn(B, K + 1, 4, 4))),
    # entropy
    ("reduction", lambda: entropy_loss(Z, reduction="elementwise")),
    ("logits", lambda: entropy_loss(Z.long())),
    ("logits", lambda: entropy_loss(Z[0])),
    ("reduction", lambda: EntropyLoss(reduction="avg")),
    # cosine similarity map (public, validated like the rest)
    ("prototypes", lambda: cosine_similarity_map(F4, torch.randn(K, D + 1))),
    ("prototypes", lambda: cosine_similarity_map(F4, torch.randint(0, 3, (K, D)))),
    ("prototypes", lambda: cosine_similarity_map(F4, torch.randn(B + 1, K, D))),
    ("features", lambda: cosine_similarity_map(F4[0], P)),
    ("features", lambda: cosine_similarity_map(F4.long(), P)),
    ("prototypes", lambda: cosine_similarity_map(F4, P.to("meta"))),
    ("eps", lambda: cosine_similarity_map(F4, P, eps=0.0)),
    # label histogram
    ("ignore_index", lambda: label_histogram(Y, (4, 4), K, ignore_index=2.5)),
    ("size", lambda: label_histogram(Y, (4,), K)),
    # min_purity wherever resize="purity" is accepted
    ("min_purity", lambda: fcl_loss(F4, P, Y, resize="purity", min_purity=-0.1)),
    ("min_purity", lambda: PixelPrototypeContrastiveLoss(min_purity=1.2)),
    ("min_purity", lambda: _ema().update(F4, Y, resize="purity", min_purity=2.0)),
    ("min_purity", lambda: BidirectionalContrast(K, D, min_purity=1.5)),
    ("min_purity", lambda: resize_labels(Y, (4, 4), mode="purity", num_classes=K, min_purity=1.1)),
    ("ignore_index", lambda: resize_labels(Y, (4, 4), ignore_index=2.5)),
    # resize
    ("size", lambda: resize_labels(Y, (0, 3))),
    ("mode", lambda: resize_labels(Y, (4, 4), mode="bilinear")),
    ("num_classes", lambda: resize_labels(Y, (4, 4), mode="purity")),
    ("labels", lambda: resize_labels(Y.float(), (4, 4))),
    # orchestrator
    ("fuse", lambda: BidirectionalContrast(K, D, fuse="union")),
    ("momentum", lambda: BidirectionalContrast(K, D, momentum=1.0)),
    ("threshold", lambda: BidirectionalContrast(K, D, threshold=2.0)),
    ("temperature", lambda: BidirectionalContrast(K, D, temperature=0.0)),
    ("absent", lambda: BidirectionalContrast(K, D, absent="drop")),
    ("at", lambda: BidirectionalContrast(K, D, at="both")),
    ("fcl_weight", lambda: BidirectionalContrast(K, D, fcl_weight=-0.1)),
    ("source_features", lambda: _step()(torch.randn(B, D + 1, 4, 4), Y, F4, Y)),
    (
        "target_features",
        lambda: _step()(F4, Y, torch.randn(B + 1, D, 4, 4), torch.randint(0, K, (B + 1, 8, 8))),
    ),
    ("static_labels", lambda: _step()(F4, Y, F4, torch.full((B, 8, 8), 33))),
    ("source_labels", lambda: _step()(F4, Y.float(), F4, Y)),
    # device mismatch, testable without a GPU: the "meta" device is another device that holds no data
    ("prototypes", lambda: pixel_prototype_contrastive_loss(F4, P.to("meta"), Y)),
    ("labels", lambda: pixel_prototype_contrastive_loss(F4, P, Y.to("meta"))),
    (
        "class_weight",
        lambda: pixel_prototype_contrastive_loss(F4, P, Y, class_weight=torch.ones(K, device="meta")),
    ),
    ("weights", lambda: masked_average_pool(F4, Y, K, weights=torch.rand(B, 4, 4, device="meta"))),
    ("labels", lambda: masked_average_pool(F4, Y.to("meta"), K)),
    ("dynamic_labels", lambda: hybrid_fuse(Y, Y.to("meta"))),
    ("counts", lambda: _ema().update_from(P, torch.ones(B, K, device="meta"))),
    ("target_ema", lambda: domain_bias_calibrate(P, torch.randn(K, D), torch.randn(K, D, device="meta"))),
    ("class_thresholds", lambda: static_pseudo_label(Z, class_thresholds=torch.ones(K, device="meta"))),
    ("logits", lambda: ClassBalancedThresholds(K).update(torch.randn(B, K, 4, 4, device="meta"))),
    ("valid", lambda: dynamic_pseudo_label(F4, P, valid=torch.ones(K, dtype=torch.bool, device="meta"))),
    ("target_features", lambda: _step()(F4, Y, F4.to("meta"), Y.to("meta"))),
    # the switch itself
    ("enabled", lambda: protocl.set_value_checks(1)),
]


@pytest.mark.parametrize(
    ("argname", "call"), MALFORMED, ids=[f"{i:02d}-{a}" for i, (a, _) in enumerate(MALFORMED)]
)
def test_malformed_call_names_the_argument(argname, call):
    with pytest.raises((ValueError, TypeError), match=rf"\b{re.escape(argname)}\b") as info:
        call()
    assert "expected" in str(info.value).lower(), str(info.value)


def test_at_least_thirty_malformed_calls():
    assert len(MALFORMED) >= 30


# --------------------------------------------------------------------------------------- value checks
RAW_ID_CALLS = [
    ("labels", lambda y: masked_average_pool(F4, y, 19)),
    ("labels", lambda y: pixel_prototype_contrastive_loss(F4, torch.randn(19, D), y)),
    ("labels", lambda y: pixel_prototype_contrastive_loss(F4, torch.randn(19, D), y, at="label")),
    ("labels", lambda y: PrototypeEMA(19, D).update(F4, y)),
    ("source_labels", lambda y: BidirectionalContrast(19, D)(F4, y, F4, torch.zeros_like(y))),
    ("static_labels", lambda y: BidirectionalContrast(19, D)(F4, torch.zeros_like(y), F4, y)),
]


def _raw_ids():
    y = torch.randint(0, 19, (B, 8, 8))
    y[1, 3, 4] = 33  # a raw Cityscapes id (bicycle) passed instead of the train id 18
    return y


@pytest.mark.parametrize(("argname", "call"), RAW_ID_CALLS, ids=[str(i) for i in range(len(RAW_ID_CALLS))])
def test_raw_label_ids_raise_in_eager(argname, call):
    assert protocl.value_checks_enabled()
    with pytest.raises(ValueError, match=rf"\b{argname}\b.*33|33.*\b{argname}\b"):
        call(_raw_ids())


@pytest.mark.parametrize(("argname", "call"), RAW_ID_CALLS, ids=[str(i) for i in range(len(RAW_ID_CALLS))])
def test_value_checks_switch_off(argname, call):
    protocl.set_value_checks(False)
    assert not protocl.value_checks_enabled()
    call(_raw_ids())  # no ValueError: the check is skipped
    protocl.set_value_checks(True)
    with pytest.raises(ValueError):
        call(_raw_ids())


def test_value_checks_are_skipped_while_compiling():
    def fn(f, p, y):
        return pixel_prototype_contrastive_loss(f, p, y, at="label")

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    protos = torch.randn(19, D)
    raw = _raw_ids()
    expected = fn(F4, protos, torch.where(raw == 33, 255, raw))
    got = compiled(F4, protos, raw)  # would raise in eager mode
    assert torch.isfinite(got)
    with pytest.raises(ValueError):
        fn(F4, protos, raw)
    torch.testing.assert_close(got, expected)


def test_checks_off_bad_ids_do_not_touch_other_pixels():
    # with checks off an out-of-range id must not crash nor leak into other images' terms
    protocl.set_value_checks(False)
    f = torch.randn(B, D, 4, 4, dtype=torch.float64)
    y_bad = _raw_ids()
    y_bad[0, 0, 0] = 33
    y_ign = torch.where(y_bad == 33, 255, y_bad)
    protos = torch.randn(B, 19, D, dtype=torch.float64)
    for at in ("feature", "label"):
        a = pixel_prototype_contrastive_loss(f, protos, y_bad, at=at, reduction="sum")
        b = pixel_prototype_contrastive_loss(f, protos, y_ign, at=at, reduction="sum")
        torch.testing.assert_close(a, b)
    step_a, step_b = (
        BidirectionalContrast(19, D, at="label").double(),
        BidirectionalContrast(19, D, at="label").double(),
    )
    y_t = torch.randint(0, 19, (B, 8, 8))  # (bad static ids would be kept by the "fill" fusion, by design)
    torch.testing.assert_close(step_a(f, y_bad, f, y_t).loss, step_b(f, y_ign, f, y_t).loss)


def test_no_assert_statements_reach_the_user():
    # validation uses built-in exceptions: python -O must not change behaviour
    with pytest.raises(ValueError):
        masked_average_pool(F4, Y, K, resize="nope")


# ------------------------------------------------------------------------------------------------ issue 18

Y4 = Y[:, None]  # mmseg's gt_semantic_seg layout (B, 1, H, W)

LABEL_4D_CALLS = {
    "masked_average_pool": lambda y: masked_average_pool(F4, y, K),
    "masked_average_pool-weights": lambda y: masked_average_pool(F4, y, K, weights=torch.ones(B, 1, 8, 8)),
    "masked_average_pool-purity": lambda y: masked_average_pool(F4, y, K, resize="purity"),
    "ema.update": lambda y: _ema_after(lambda e: e.update(F4, y)),
    "fcl_loss": lambda y: fcl_loss(F4, P, y),
    "bcl_loss-label": lambda y: bcl_loss(F4, P, y, at="label", reduction="none"),
    "pixel_prototype_contrastive_loss": lambda y: pixel_prototype_contrastive_loss(F4, P, y, reduction="sum"),
    "module": lambda y: PixelPrototypeContrastiveLoss(at="label")(F4, P, y),
    "overlap_class_weight": lambda y: overlap_class_weight(y, y.flip(-1), K, size=(4, 4)),
    "resize_labels": lambda y: resize_labels(y, (3, 5)),
    "resize_labels-purity": lambda y: resize_labels(y, (3, 5), mode="purity", num_classes=K),
    "label_histogram": lambda y: label_histogram(y, (3, 5), K),
    "hybrid_fuse-static": lambda y: hybrid_fuse(y, torch.zeros(B, 4, 4, dtype=torch.long)),
    "hybrid_fuse-dynamic": lambda y: hybrid_fuse(torch.full((B, 8, 8), 255), y),
    "orchestrator": lambda y: _step()(F4, y, F4, y, update=False).loss,
}


def _ema_after(update):
    ema = _ema()
    update(ema)
    return ema.prototypes


@pytest.mark.parametrize("name", list(LABEL_4D_CALLS))
def test_mmseg_label_shape_accepted_everywhere(name):
    # issue 18.5: (B, 1, H, W) labels mean the (B, H, W) map in every function that takes labels
    call = LABEL_4D_CALLS[name]
    got, expected = call(Y4), call(Y)
    for g, e in zip(got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)):
        assert g.shape == e.shape
        assert torch.equal(g, e)


def test_label_map_squeezes_without_a_copy():
    view = _validation.label_map(Y4, "labels")
    assert view.shape == Y.shape and view.data_ptr() == Y4.data_ptr()
    with pytest.raises(ValueError, match=r"labels: expected a tensor of shape \(B, H, W\) or \(B, 1, H, W\)"):
        _validation.label_map(torch.stack([Y, Y], 1), "labels")


def _channels_last(f):
    return f.permute(0, 2, 3, 1)  # b d h w -> b h w d


def test_channels_last_features_are_named():
    # issue 18.2: (B, h, w, D) features, as ViT/SegFormer code holds them; each call names the layout and the fix
    f = torch.randn(B, 16, 8, 8)  # D = 16 on an 8 x 8 grid
    fl = _channels_last(f)
    y_grid, y_full = torch.randint(0, K, (B, 8, 8)), torch.randint(0, K, (B, 32, 32))
    fix = r"channels-last \(B, h, w, D\).*features\.permute\(0, 3, 1, 2\)"
    for y in (y_grid, y_full):  # labels on the feature grid, and at 4x the grid
        with pytest.raises(ValueError, match=fix):
            masked_average_pool(fl, y, K)
    protos = torch.randn(B, K, 16)
    for call in (
        lambda: pixel_prototype_contrastive_loss(fl, protos, torch.randint(0, K, (B, 7, 9))),  # by the prototypes' D
        lambda: cosine_similarity_map(fl, protos),
        lambda: dynamic_pseudo_label(fl, protos),
    ):
        with pytest.raises(ValueError, match=r"channels-last \(B, h, w, D\)"):
            call()
    with pytest.raises(ValueError, match=fix):
        PrototypeEMA(K, 16).update(fl, torch.randint(0, K, (B, 5, 5)))


def test_channels_first_features_are_not_mistaken():
    # the detection must not refuse legitimate layouts: D equal to the grid, tiny grids, unusual label sizes
    cases = [((B, 8, 8, 8), (B, 32, 32)), ((B, 2, 1, 1), (B, 2, 1)), ((B, 16, 8, 8), (B, 16, 16)),
             ((B, 76, 92, 92), (B, 730, 730)), ((B, 4, 12, 6), (B, 12, 6))]
    for fshape, yshape in cases:
        masked_average_pool(torch.randn(fshape), torch.randint(0, K, yshape), K)


def test_class_balanced_thresholds_compute_before_update_raises():
    # issue 18.4: a static-label pass that forgot update() must not silently label nothing
    cbt = ClassBalancedThresholds(K)
    with pytest.raises(RuntimeError, match=r"no confidences accumulated.*update\(logits\)"):
        cbt.compute()
    with pytest.raises(RuntimeError):
        cbt()
    z = torch.zeros(1, K, 4, 4)
    z[:, 1] = 5.0  # every pixel predicted as class 1
    cbt.update(z)
    t = cbt.compute()
    assert torch.isfinite(t[1]) and torch.all(torch.isinf(t[torch.arange(K) != 1]))  # +inf kept after updates


def _naive_violation(labels, k_n, ignore):
    bad = [v for v in labels.flatten().tolist() if not (0 <= v < k_n or v == ignore)]
    return bad


@pytest.mark.parametrize(
    ("values", "k_n", "ignore"),
    [([0, 1, 2, 255], 19, 255), ([0, 18, 255, 33], 19, 255), ([0, -3, 255], 19, 255), ([5, 4, 300], 19, 255),
     ([0, 1, -1], 3, -1), ([0, 1, -1, 7], 3, -1), ([0, 2, -2, -1], 3, -1), ([0, 1, 2], 3, 1), ([0, 3, 1], 3, 1),
     ([255, 255], 19, 255), ([19], 19, 255), ([0, 254, 255], 19, 255), ([0, 18, 200], 19, 200),
     ([0, 19, 200], 19, 200), ([0, 199, 200], 19, 200), ([3, 200], 19, 200), ([0, 1, 300], 19, 300),
     ([0, 20, 300], 19, 300), ([1, 0, 19], 1, 19), ([0, 255], 1, 255), ([1, 255], 1, 255)],
)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_host_label_check_agrees_with_a_naive_scan(values, k_n, ignore, dtype):
    # issue 18.9: the cheaper CPU check (aminmax, a second pass only when needed) finds exactly the bad maps
    if dtype == torch.uint8 and (min(values) < 0 or max(values) > 255):
        pytest.skip("not representable in uint8")
    labels = torch.tensor(values, dtype=dtype).repeat(3).view(1, 3, len(values))
    bad = _naive_violation(labels, k_n, ignore)
    found = _validation._host_label_violation(labels, k_n, ignore)
    assert (found is None) == (not bad)
    if bad:
        assert found in bad
    device_count, device_example = _validation._device_label_verdict(labels, k_n, ignore).tolist()
    assert device_count == len(bad) and (not bad or device_example in bad)


def test_every_call_checks_its_labels_again(monkeypatch):
    # issue 28: no cache of checked tensors: each call checks the label maps it receives, so a map changed in
    # place (or a tensor that happens to reuse a freed tensor's id) is never waved through
    calls = []
    real = _validation._host_label_violation
    monkeypatch.setattr(_validation, "_host_label_violation", lambda *a: calls.append(1) or real(*a))
    y = torch.randint(0, K, (B, 8, 8))
    pooled = masked_average_pool(F4, y, K)
    fcl_loss(F4, pooled, y)
    assert len(calls) == 2
    y[1, 2, 3] = 33  # in place
    with pytest.raises(ValueError, match=r"masked_average_pool: labels.*33"):
        masked_average_pool(F4, y, K)
    # a loader's buffer rewritten through numpy moves no version counter: the removed cache waved this through
    buffer = np.zeros((B, 8, 8), dtype=np.int64)
    shared = torch.from_numpy(buffer)
    masked_average_pool(F4, shared, K)
    buffer[0, 0, 0] = 33
    with pytest.raises(ValueError, match=r"masked_average_pool: labels.*33"):
        masked_average_pool(F4, shared, K)


def test_deferred_device_checks_report_on_a_later_call(deferred_checks):
    # issue 18.9: the CUDA path's logic on CPU: the bad call does not raise (no host read), a later one does
    bad = _raw_ids()
    masked_average_pool(F4, bad, 19)  # verdict queued, nothing read
    assert len(_validation._PENDING) == 1
    with pytest.raises(ValueError, match=r"masked_average_pool: labels: expected label ids in \[0, 19\).*got 33.*later"):
        fcl_loss(F4, torch.randn(19, D), torch.zeros(B, 8, 8, dtype=torch.long))
    assert not _validation._PENDING
    step = BidirectionalContrast(19, D)
    step(F4, torch.zeros_like(bad), F4, bad)
    with pytest.raises(ValueError, match=r"BidirectionalContrast.forward: static_labels.*33"):
        protocl.flush_value_checks()
    with pytest.raises(ValueError, match=r"masked_average_pool: weights: expected non-negative"):
        masked_average_pool(F4, torch.zeros(B, 8, 8, dtype=torch.long), 19, weights=-torch.ones(B, 4, 4))
        protocl.flush_value_checks()
    protocl.flush_value_checks()  # nothing pending: returns
    masked_average_pool(F4, bad.clone(), 19)
    with pytest.raises(ValueError, match=r"labels.*33"):  # the switch is a public call too: it reports ...
        protocl.set_value_checks(False)
    assert not protocl.value_checks_enabled()  # ... after switching
    masked_average_pool(F4, bad.clone(), 19)  # off: nothing queued
    assert not _validation._PENDING


# Every public function and public method of protocl, called on good inputs (issue 28: each one reports a verdict
# that an earlier call left pending). Keyed by qualified name; the test below checks the keys are complete.
def _good_calls():
    y = torch.randint(0, K, (B, 8, 8))
    pooled = masked_average_pool(F4, y, K)
    ema = PrototypeEMA(K, D)
    ema.update(F4, y)
    cbt = ClassBalancedThresholds(K)
    cbt.update(Z)
    step = _step()
    return {
        "masked_average_pool": lambda: masked_average_pool(F4, y, K),
        "PrototypeEMA.forward": lambda: ema(),
        "PrototypeEMA.update": lambda: ema.update(F4, y),
        "PrototypeEMA.update_from": lambda: ema.update_from(*pooled),
        "domain_bias_calibrate": lambda: domain_bias_calibrate(P, ema, ema),
        "pixel_prototype_contrastive_loss": lambda: pixel_prototype_contrastive_loss(F4, pooled, y),
        "fcl_loss": lambda: fcl_loss(F4, pooled, y),
        "bcl_loss": lambda: bcl_loss(F4, pooled, y),
        "overlap_class_weight": lambda: overlap_class_weight(y, y, K, size=(4, 4)),
        "cosine_similarity_map": lambda: cosine_similarity_map(F4, pooled),
        "PixelPrototypeContrastiveLoss.forward": lambda: PixelPrototypeContrastiveLoss()(F4, pooled, y),
        "dynamic_pseudo_label": lambda: dynamic_pseudo_label(F4, pooled),
        "hybrid_fuse": lambda: hybrid_fuse(y, y),
        "static_pseudo_label": lambda: static_pseudo_label(Z),
        "ClassBalancedThresholds.update": lambda: cbt.update(Z),
        "ClassBalancedThresholds.compute": lambda: cbt.compute(),
        "ClassBalancedThresholds.forward": lambda: cbt(),
        "ClassBalancedThresholds.reset": lambda: cbt.reset(),
        "entropy_loss": lambda: entropy_loss(Z),
        "EntropyLoss.forward": lambda: EntropyLoss()(Z),
        "BidirectionalContrast.forward": lambda: step(F4, y, F4, y),
        "BidirectionalContrast.calibrated": lambda: step.calibrated(P),
        "resize_labels": lambda: resize_labels(y, (4, 4)),
        "nearest_source_index": lambda: protocl.nearest_source_index(4, 8),
        "label_histogram": lambda: label_histogram(y, (4, 4), K),
        "set_value_checks": lambda: protocl.set_value_checks(True),
        "value_checks_enabled": lambda: protocl.value_checks_enabled(),
        "flush_value_checks": lambda: protocl.flush_value_checks(),
    }


def _public_callables():
    """Qualified names of protocl's public functions and of the public methods its public classes define."""
    names = set()
    for name in protocl.__all__:
        obj = getattr(protocl, name)
        if inspect.isfunction(obj):
            names.add(name)
        elif inspect.isclass(obj) and issubclass(obj, torch.nn.Module):
            for attr, member in vars(obj).items():
                if inspect.isfunction(member) and (not attr.startswith("_")) and attr != "extra_repr":
                    names.add(f"{name}.{attr}")
    return names


def test_the_table_of_public_calls_is_complete():
    assert set(_good_calls()) == _public_callables()


@pytest.mark.parametrize("name", sorted(_public_callables()))
def test_a_pending_verdict_is_reported_by_the_next_public_call(deferred_checks, name):
    # issue 28: bad labels go into masked_average_pool on the device path (queued, no raise); the next call of any
    # public function or method, on good inputs, raises it, naming the function that received them and the argument
    calls = _good_calls()
    masked_average_pool(F4, _raw_ids(), 19)
    assert len(_validation._PENDING) == 1
    with pytest.raises(ValueError, match=r"^masked_average_pool: labels: expected label ids in \[0, 19\).*got 33"):
        calls[name]()
    assert not _validation._PENDING
    calls[name]()  # reported once


VALUE_CHECK_CALLS = [  # (function the message must name, argument, call with a raw id 33 in the labels / a bad weight)
    ("masked_average_pool", "labels", lambda y: masked_average_pool(F4, y, 19)),
    ("masked_average_pool", "weights", lambda y: masked_average_pool(F4, y % 19, 19, weights=-torch.ones(B, 4, 4))),
    ("pixel_prototype_contrastive_loss", "labels", lambda y: pixel_prototype_contrastive_loss(F4, torch.randn(19, D), y)),
    ("pixel_prototype_contrastive_loss", "labels", lambda y: PixelPrototypeContrastiveLoss()(F4, torch.randn(19, D), y)),
    ("fcl_loss", "target_labels", lambda y: fcl_loss(F4, torch.randn(19, D), y)),
    ("bcl_loss", "source_labels", lambda y: bcl_loss(F4, torch.randn(19, D), y, at="label")),
    ("bcl_loss", "pixel_weight", lambda y: bcl_loss(F4, torch.randn(19, D), y % 19, pixel_weight=-torch.ones(B))),
    ("overlap_class_weight", "target_labels", lambda y: overlap_class_weight(y % 19, y, 19, size=(4, 4))),
    ("resize_labels", "labels", lambda y: resize_labels(y, (4, 4), mode="purity", num_classes=19)),
    ("label_histogram", "labels", lambda y: label_histogram(y, (4, 4), 19)),
    ("PrototypeEMA.update", "labels", lambda y: PrototypeEMA(19, D).update(F4, y)),
    ("PrototypeEMA.update", "weights", lambda y: PrototypeEMA(19, D).update(F4, y % 19, weights=-torch.ones(B, 4, 4))),
    ("BidirectionalContrast.forward", "source_labels", lambda y: BidirectionalContrast(19, D)(F4, y, F4, y % 19)),
    ("BidirectionalContrast.forward", "target_weight",
     lambda y: BidirectionalContrast(19, D)(F4, y % 19, F4, y % 19, target_weight=-torch.ones(B))),
]


@pytest.mark.parametrize("deferred", [False, True], ids=["host", "deferred"])
@pytest.mark.parametrize(("fn", "argname", "call"), VALUE_CHECK_CALLS, ids=[str(i) for i in range(len(VALUE_CHECK_CALLS))])
def test_value_check_messages_name_the_function_and_the_argument(request, deferred, fn, argname, call):
    expected = rf"^{re.escape(fn)}: {argname}: expected"
    if not deferred:
        with pytest.raises(ValueError, match=expected):
            call(_raw_ids())
        return
    request.getfixturevalue("deferred_checks")
    call(_raw_ids())  # queued
    with pytest.raises(ValueError, match=expected):
        protocl.flush_value_checks()


@pytest.mark.needs_cuda
def test_default_value_checks_never_sync_on_cuda():
    # issue 18.9: with the default checks on, a CUDA step makes no host synchronisation; bad labels still raise
    dev = torch.device("cuda")
    f = torch.randn(B, D, 4, 4, device=dev, requires_grad=True)
    y = torch.randint(0, 19, (B, 8, 8), device=dev)
    step = BidirectionalContrast(19, D).to(dev)
    protocl.flush_value_checks()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled = masked_average_pool(f, y, 19)
        loss = fcl_loss(f, pooled, y) + bcl_loss(f, pooled, y[:, None], pixel_weight=torch.ones(B, device=dev))
        out = step(f, y, f, y)
        (loss + out.loss).backward()
        bad = y.clone()
        bad[0, 0, 0] = 33
        masked_average_pool(f, bad, 19)  # queued on the device, no raise and no sync here
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match=r"labels.*33"):
        protocl.flush_value_checks()


@pytest.mark.needs_cuda
def test_a_pending_cuda_verdict_is_reported_without_a_sync():
    # issue 28: on CUDA the report of a pending verdict reads pinned host memory behind a completed event: no
    # host synchronisation, by every public call (a sample of them here), under the sync debug mode "error"
    dev = torch.device("cuda")
    f = torch.randn(B, D, 4, 4, device=dev)
    y = torch.randint(0, 19, (B, 8, 8), device=dev)
    protocl.flush_value_checks()
    calls = [lambda: fcl_loss(f, torch.randn(19, D, device=dev), y), lambda: hybrid_fuse(y, y),
             lambda: entropy_loss(torch.randn(B, 19, 8, 8, device=dev)),
             lambda: cosine_similarity_map(f, torch.randn(19, D, device=dev)),
             lambda: dynamic_pseudo_label(f, torch.randn(19, D, device=dev))]
    for call in calls:
        bad = y.clone()
        bad[0, 0, 0] = 33
        masked_average_pool(f, bad, 19)  # queued
        torch.cuda.synchronize()  # the verdict is on the host now; the report must not sync itself
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(ValueError, match=r"^masked_average_pool: labels: .*33"):
                call()
        finally:
            torch.cuda.set_sync_debug_mode(0)
