r"""The orchestrator (spec section 3, steps 1-7) against a reference step built from the loop references."""

import pytest
import reference as ref
import torch

from protocl import BidirectionalContrast

K, D = 5, 4


def _domain_batch(b_n, grid, label_size, centers, shift, noise=0.4, ignore_frac=0.2):
    r"""Features near class ``centers`` (+ a domain ``shift``) laid out by random labels on the label grid."""
    labels = ref.random_labels(b_n, *label_size, K, ignore_frac=ignore_frac)
    cells = torch.from_numpy(ref.resize_nearest(labels, grid))
    fill = torch.where(cells == 255, torch.randint(K, cells.shape), cells)
    feats = centers[fill] + shift + noise * torch.randn(b_n, *grid, centers.shape[1], dtype=centers.dtype)
    return feats.permute(0, 3, 1, 2).contiguous(), labels


def _steps(n, b_n=2, grid_s=(4, 5), grid_t=(5, 4), label_s=(9, 11), label_t=(10, 7)):
    centers = 2 * torch.randn(K, D, dtype=torch.float64)
    shift = 0.5 * torch.randn(D, dtype=torch.float64)
    out = []
    for _ in range(n):
        fs, ys = _domain_batch(b_n, grid_s, label_s, centers, 0.0)
        ft, yt_true = _domain_batch(b_n, grid_t, label_t, centers, shift)
        static = torch.where(torch.rand(yt_true.shape) < 0.5, yt_true, torch.full_like(yt_true, 255))
        out.append((fs, ys, ft, static))
    return out


def _check(out, expected, model, reference):
    torch.testing.assert_close(
        out.fcl.detach().double(), torch.tensor(expected["fcl"], dtype=torch.float64), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(
        out.bcl.detach().double(), torch.tensor(expected["bcl"], dtype=torch.float64), rtol=1e-6, atol=1e-8
    )
    torch.testing.assert_close(
        out.loss.detach().double(), torch.tensor(expected["loss"], dtype=torch.float64), rtol=1e-6, atol=1e-8
    )
    assert torch.equal(out.target_labels, torch.from_numpy(expected["target_labels"]))
    if reference.cfg["dynamic"]:
        assert torch.equal(out.dynamic_labels, torch.from_numpy(expected["dynamic_labels"]))
    for ema, ref_ema in ((model.source_ema, reference.source_ema), (model.target_ema, reference.target_ema)):
        assert ema.initialized.tolist() == ref_ema.initialized.tolist()
        torch.testing.assert_close(
            ema.prototypes.double(), torch.from_numpy(ref_ema.prototypes), rtol=1e-5, atol=1e-6
        )


CONFIGS = [
    {},
    {"threshold": 0.3, "momentum": 0.5},
    {"threshold": 0.3, "momentum": 0.5, "calibrate": False},
    {"threshold": 0.3, "momentum": 0.5, "dynamic": False},
    {"threshold": 0.3, "momentum": 0.0, "fuse": "agree", "absent": "min_similarity"},
    {
        "threshold": 0.2,
        "momentum": 0.9,
        "fuse": "dynamic_first",
        "at": "label",
        "fcl_weight": 0.3,
        "bcl_weight": 0.7,
    },
    {"threshold": 0.3, "momentum": 0.5, "fcl_weight": 0.0, "temperature": 0.5},
    {"threshold": 0.3, "momentum": 0.5, "release_compatible": True},
    {"threshold": 0.3, "momentum": 0.5, "resize": "purity"},
    {"threshold": 0.3, "momentum": 0.5, "resize": "purity", "min_purity": 0.4},
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default"
)
def test_step_sequence_matches_reference(config):
    model = BidirectionalContrast(K, D, **config)
    reference = ref.StepRef(K, D, **config)
    for fs, ys, ft, static in _steps(3):
        out = model(fs, ys, ft, static)
        expected = reference(fs, ys, ft, static)
        _check(out, expected, model, reference)


def test_update_false_leaves_emas_untouched():
    model = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    (fs, ys, ft, static), second = _steps(2)
    model(fs, ys, ft, static)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(*second, update=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_eval_mode_freezes_the_emas_like_batchnorm():
    # issue 18.3: .eval() stops the EMA updates whatever the grad mode; update= overrides the mode per call
    model = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    (fs, ys, ft, static), second, third = _steps(3)
    model(fs, ys, ft, static)  # training mode (the default): updates
    assert model.training and bool(model.source_ema.initialized.any())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        model(*second)
    model(*second)  # eval with grad on: still frozen
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    model(*second, update=True)  # explicit override in eval mode
    assert not torch.equal(model.source_ema.prototypes, state["source_ema.prototypes"])
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # no_grad alone does not freeze (BatchNorm's running stats update under no_grad too)
        model(*third)
    assert not torch.equal(model.target_ema.prototypes, state["target_ema.prototypes"])


def test_eval_step_equals_train_step_without_update():
    (fs, ys, ft, static), second = _steps(2)
    a, b = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3), BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    a(fs, ys, ft, static)
    b(fs, ys, ft, static)
    out_eval = b.eval()(*second)
    out_off = a(*second, update=False)
    assert torch.equal(out_eval.loss, out_off.loss) and torch.equal(out_eval.target_labels, out_off.target_labels)
    with pytest.raises(TypeError, match=r"update: expected a bool"):
        a(*second, update=1)


@pytest.mark.parametrize("config", [{"threshold": 0.3, "momentum": 0.5}, {"threshold": 0.3, "at": "label"},
                                    {"threshold": 0.3, "release_compatible": True}])
@pytest.mark.parametrize("kind", ["label", "feature", "image"])
def test_weights_pass_through_to_the_reference(config, kind):
    # issue 18.6: target_weight (FCL's pixels), source_weight (BCL's pixels) and class_weight through the step
    model = BidirectionalContrast(K, D, **config)
    reference = ref.StepRef(K, D, **config)
    g = torch.Generator().manual_seed(0)
    for fs, ys, ft, static in _steps(2):
        if kind == "label":
            sw = torch.rand(ys.shape, generator=g, dtype=torch.float64)
            tw = torch.rand(static.shape, generator=g, dtype=torch.float64)
        elif kind == "feature":
            sw = torch.rand(fs[:, 0].shape, generator=g, dtype=torch.float64)
            tw = torch.rand(ft[:, 0].shape, generator=g, dtype=torch.float64)
        else:
            sw = torch.rand(fs.shape[0], generator=g, dtype=torch.float64)
            tw = torch.rand(ft.shape[0], generator=g, dtype=torch.float64)
        cw = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
        out = model(fs, ys, ft, static, source_weight=sw, target_weight=tw, class_weight=cw)
        expected = reference(fs, ys, ft, static, source_weight=sw, target_weight=tw, class_weight=cw)
        _check(out, expected, model, reference)
        plain = BidirectionalContrast(K, D, **config)(fs, ys, ft, static, update=False)
        assert not torch.allclose(plain.loss, out.loss)  # the weights did something


def test_mmseg_label_shape_through_the_step():
    # issue 18.5: gt_semantic_seg (B, 1, H, W) for both label inputs; the returned maps are (B, H, W)
    (fs, ys, ft, static), = _steps(1)
    a, b = BidirectionalContrast(K, D, threshold=0.3), BidirectionalContrast(K, D, threshold=0.3)
    out4, out3 = a(fs, ys[:, None], ft, static[:, None]), b(fs, ys, ft, static)
    assert torch.equal(out4.loss, out3.loss) and torch.equal(out4.target_labels, out3.target_labels)
    assert out4.target_labels.shape == static.shape


def test_channels_last_features_are_named_by_the_orchestrator():
    # issue 18.2: (B, h, w, D) features are refused with the layout and the fix
    (fs, ys, ft, static), = _steps(1, grid_s=(6, 7), label_s=(6, 7))  # labels on the grid: shapes tell
    model = BidirectionalContrast(K, D)
    with pytest.raises(ValueError, match=r"source_features: .*its last dimension is D = 4"):
        model(fs.permute(0, 2, 3, 1), ys[:, :6, :4].contiguous(), ft, static)  # only the channel count tells
    with pytest.raises(ValueError, match=r"source_features: .*channels-last \(B, h, w, D\).*permute\(0, 3, 1, 2\)"):
        model(fs.permute(0, 2, 3, 1), ys, ft, static)


def test_first_step_calibration_is_identity_and_step_uses_previous_emas():
    # before any update the EMAs are not initialised: calibrated == uncalibrated prototypes
    ((fs, ys, ft, static),) = _steps(1)
    a = BidirectionalContrast(K, D, threshold=0.3)
    b = BidirectionalContrast(K, D, threshold=0.3, calibrate=False)
    out_a, out_b = a(fs, ys, ft, static), b(fs, ys, ft, static)
    assert torch.equal(out_a.dynamic_labels, out_b.dynamic_labels)
    torch.testing.assert_close(out_a.loss, out_b.loss)


def test_gradients_reach_both_feature_maps_and_stats_are_detached():
    ((fs, ys, ft, static),) = _steps(1)
    fs.requires_grad_(True)
    ft.requires_grad_(True)
    out = BidirectionalContrast(K, D, threshold=0.3)(fs, ys, ft, static)
    out.loss.backward()
    assert fs.grad.abs().sum() > 0 and ft.grad.abs().sum() > 0
    assert all(not v.requires_grad for v in out.stats.values())
    assert out.target_labels.shape == static.shape and out.dynamic_labels.shape == static.shape
    assert out.target_labels.dtype == torch.int64


def test_fill_keeps_every_static_label():
    ((fs, ys, ft, static),) = _steps(1)
    out = BidirectionalContrast(K, D, threshold=-1.0)(fs, ys, ft, static)
    labelled = static != 255
    assert torch.equal(out.target_labels[labelled], static[labelled])
    assert torch.all(out.target_labels != 255)  # threshold -1: every pixel gets a dynamic label


def test_empty_batch_gives_zero_loss_not_nan():
    ((fs, ys, ft, static),) = _steps(1)
    fs.requires_grad_(True)
    out = BidirectionalContrast(K, D, dynamic=False)(
        fs, torch.full_like(ys, 255), ft, torch.full_like(static, 255)
    )
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert torch.all(fs.grad == 0)


def test_state_dict_round_trip_continues_identically():
    steps = _steps(3)
    a = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    a(*steps[0])
    b = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    b.load_state_dict(a.state_dict())
    for batch in steps[1:]:
        oa, ob = a(*batch), b(*batch)
        assert torch.equal(oa.loss, ob.loss) and torch.equal(oa.target_labels, ob.target_labels)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_features_close_to_fp32(dtype):
    ((fs, ys, ft, static),) = _steps(1)
    fs, ft = fs.float().to(dtype), ft.float().to(dtype)
    half = BidirectionalContrast(K, D, dynamic=False)(fs, ys, ft, static)
    full = BidirectionalContrast(K, D, dynamic=False)(fs.float(), ys, ft.float(), static)
    assert torch.isfinite(half.loss)
    torch.testing.assert_close(half.loss.float(), full.loss, rtol=2e-3, atol=2e-3)


def test_no_hard_coded_sizes():
    # K = 23, D = 260 channels, B = 3, different grids and label sizes per domain
    k_n, dim, b_n = 23, 260, 3
    fs, ft = (
        torch.randn(b_n, dim, 3, 5, dtype=torch.float64),
        torch.randn(b_n, dim, 4, 2, dtype=torch.float64),
    )
    ys = ref.random_labels(b_n, 7, 9, k_n)
    yf = ref.random_labels(b_n, 5, 6, k_n, ignore_frac=0.6)
    model = BidirectionalContrast(k_n, dim, threshold=0.0, momentum=0.5)
    reference = ref.StepRef(k_n, dim, threshold=0.0, momentum=0.5)
    _check(model(fs, ys, ft, yf), reference(fs, ys, ft, yf), model, reference)


@pytest.mark.parametrize("release_compatible", [False, True])
def test_weighted_step_gradcheck(release_compatible):
    # issue 18.6: the orchestrator's loss with source/target/class weights is differentiable as written
    ((fs, ys, ft, static),) = _steps(1)
    g = torch.Generator().manual_seed(1)
    sw = torch.rand(ys.shape, generator=g, dtype=torch.float64)
    tw = torch.rand(ft.shape[0], generator=g, dtype=torch.float64)
    cw = torch.rand(K, generator=g, dtype=torch.float64) + 0.2
    model = BidirectionalContrast(K, D, dynamic=False, release_compatible=release_compatible)

    def loss(f_s, f_t):
        return model(f_s, ys, f_t, static, source_weight=sw, target_weight=tw, class_weight=cw, update=False).loss

    inputs = (fs.clone().requires_grad_(True), ft.clone().requires_grad_(True))
    assert torch.autograd.gradcheck(loss, inputs, fast_mode=True)


SIMILARITY_CONFIGS = [
    {"threshold": 0.3, "momentum": 0.5},
    {"threshold": 0.3, "momentum": 0.5, "calibrate": False},
    {"threshold": 0.3, "momentum": 0.5, "dynamic": False},
    {"threshold": 0.3, "momentum": 0.5, "resize": "purity", "min_purity": 0.4},
]


@pytest.mark.parametrize(
    "config", SIMILARITY_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
)
def test_similarities_are_the_cosines_behind_the_dynamic_labels(config):
    # issue 25.4: return_similarities=True hands out the calibrated per-image source prototypes (EMAs before this
    # step's update), their validity and the target cosines to them, against the loop reference
    model = BidirectionalContrast(K, D, **config)
    reference = ref.StepRef(K, D, **config)
    for fs, ys, ft, static in _steps(3, b_n=3):
        p_s, n_s = ref.masked_average_pool(
            fs, ys, K, ignore_index=255, resize=reference.resize, min_purity=reference.min_purity
        )
        if config.get("calibrate", True):
            e_s, e_t = reference.source_ema, reference.target_ema
            p_s = ref.domain_bias_calibrate(p_s, e_s.prototypes, e_t.prototypes, e_s.initialized, e_t.initialized)
        fs.requires_grad_(True)
        ft.requires_grad_(True)
        out = model(fs, ys, ft, static, return_similarities=True)
        reference(fs.detach(), ys, ft.detach(), static)
        sims = out.similarities
        assert sims.cosine.shape == (3, K, *ft.shape[-2:]) and sims.cosine.dtype == torch.float64
        assert not (sims.cosine.requires_grad or sims.prototypes.requires_grad)
        assert sims.valid.tolist() == (torch.as_tensor(n_s) > 0).tolist()
        assert not sims.valid.all()  # a class absent from a source image (random_labels draws half the classes)
        torch.testing.assert_close(sims.prototypes, torch.as_tensor(p_s), rtol=1e-5, atol=1e-6)  # fp32 EMAs
        feats = ft.detach()
        for b in range(3):
            for k in range(K):
                if not sims.valid[b, k]:
                    assert torch.all(sims.cosine[b, k] == -torch.inf)
                    continue
                expected = [[ref.cosine(feats[b, :, i, j], p_s[b, k]) for j in range(ft.shape[3])]
                            for i in range(ft.shape[2])]
                torch.testing.assert_close(sims.cosine[b, k], torch.tensor(expected, dtype=torch.float64),
                                           rtol=1e-5, atol=1e-6)
        best, arg = sims.cosine.max(dim=1)
        y_d = torch.from_numpy(ref.resize_labels(torch.where(best > 0.3, arg, 255), static.shape[-2:]))
        if config.get("dynamic", True):
            assert torch.equal(out.dynamic_labels, y_d)
        else:
            assert torch.all(out.dynamic_labels == 255)


def test_similarities_are_opt_in_and_change_nothing_else():
    # the six fields unpack as before; without the keyword the attribute is None; with it, the step's loss,
    # labels, stats and EMAs are bit-equal to a step without it
    steps = _steps(3)
    a = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    b = BidirectionalContrast(K, D, momentum=0.5, threshold=0.3)
    for batch in steps:
        plain, asked = a(*batch), b(*batch, return_similarities=True)
        loss, fcl, bcl, target_labels, dynamic_labels, stats = asked
        assert len(asked) == 6 and plain.similarities is None and asked.similarities is not None
        for x, y in zip(plain[:5], (loss, fcl, bcl, target_labels, dynamic_labels)):
            assert torch.equal(x, y)
        assert stats.keys() == plain.stats.keys() and all(torch.equal(stats[k], plain.stats[k]) for k in stats)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    assert asked._replace(loss=asked.loss * 2).similarities is None  # documented: _replace does not carry it
    with pytest.raises(TypeError, match=r"return_similarities: expected a bool"):
        a(*steps[0], return_similarities=1)
