r"""Every training-path function compiles with ``torch.compile(fullgraph=True)`` and matches eager
(spec section 2).

``backend="eager"`` runs Dynamo's tracing (where graph breaks and host syncs are found) without
Inductor's code generation, so the whole file stays fast on CPU.
"""

import pytest
import reference as ref
import torch

from protocl import (
    BidirectionalContrast,
    ClassBalancedThresholds,
    PrototypeEMA,
    domain_bias_calibrate,
    dynamic_pseudo_label,
    entropy_loss,
    fcl_loss,
    hybrid_fuse,
    masked_average_pool,
    pixel_prototype_contrastive_loss,
    resize_labels,
    static_pseudo_label,
)

K, D = 5, 4
SHAPES = [(2, (6, 5), (13, 11)), (3, (4, 4), (9, 10))]  # (B, feature grid, label grid): two calls per test


def _shapes(dynamic):
    r"""Two calls with different shapes when shapes are dynamic; one otherwise (a second recompiles)."""
    return SHAPES if dynamic else SHAPES[:1]


def _compiled(fn, dynamic):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager", dynamic=dynamic)


def _data(b_n, grid, label):
    feats = torch.randn(b_n, D, *grid, requires_grad=True)
    labels = ref.random_labels(b_n, *label, K)
    protos = torch.randn(b_n, K, D, requires_grad=True)
    return feats, labels, protos


def _step_inputs(dynamic):
    r"""The orchestrator's inputs per call of :func:`_shapes`: ``(f_s, y_s, f_t, y_f)``, static labels half ignored."""
    for b_n, grid, label in _shapes(dynamic):
        fs, ys, _ = _data(b_n, grid, label)
        ft, _, _ = _data(b_n, grid, label)
        yield fs, ys, ft, ref.random_labels(b_n, *label, K, ignore_frac=0.5)


def _assert_same(got, expected):
    if isinstance(got, (tuple, list)):
        for g, e in zip(got, expected):
            _assert_same(g, e)
    elif isinstance(got, dict):
        for key in expected:
            _assert_same(got[key], expected[key])
    elif got is None or expected is None:
        assert got is None and expected is None
    elif got.is_floating_point():
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got, expected)


def _grads(out, inputs):
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return torch.autograd.grad(out, leaves, allow_unused=True)


LOSS_CASES = {
    "contrastive-mask-feature": lambda f, y, p: pixel_prototype_contrastive_loss(f, p, y),
    "contrastive-min_similarity-label": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y, absent="min_similarity", at="label", valid=torch.arange(K) != 2
    ),
    "contrastive-mask-label-none": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y, at="label", reduction="none", class_weight=torch.linspace(0.5, 1.5, K)
    ).sum(),
    "contrastive-purity-sum": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y, resize="purity", reduction="sum"
    ),
    "fcl-shared-prototypes": lambda f, y, p: fcl_loss(f, p[0], y, absent="min_similarity"),
    # issue 18: per-pixel weights at both grids and per image, mmseg's (B, 1, H, W) labels, PooledPrototypes
    "contrastive-pixel-weight-label-grid": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y, at="label", pixel_weight=(y % 3).to(f.dtype) * 0.5, class_weight=torch.linspace(0.5, 1.5, K)[:, None]
    ),
    "contrastive-pixel-weight-feature-grid": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y[:, None], pixel_weight=f.detach().abs().sum(1)
    ),
    "contrastive-pixel-weight-per-image-none": lambda f, y, p: pixel_prototype_contrastive_loss(
        f, p, y, at="label", reduction="none", pixel_weight=torch.linspace(0.5, 1.0, f.shape[0])
    ).sum(),
    "fcl-pooled-prototypes": lambda f, y, p: fcl_loss(f, masked_average_pool(f, y.clamp_max(2), K), y),
    "map-per-image": lambda f, y, p: masked_average_pool(f, y, K).prototypes.square().sum(),
    "map-batch-weights": lambda f, y, p: masked_average_pool(
        f, y, K, per_image=False, weights=torch.ones_like(f[:, 0])
    ).prototypes.sum(),
    "calibrate": lambda f, y, p: domain_bias_calibrate(
        p, torch.ones(K, D), torch.zeros(K, D), source_initialized=torch.arange(K) > 1
    ).sum(),
    "entropy": lambda f, y, p: entropy_loss(torch.einsum("bdhw,bkd->bkhw", f, p)),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_differentiable_ops_compile_and_match(case, dynamic):
    fn = LOSS_CASES[case]
    compiled = _compiled(fn, dynamic)
    for b_n, grid, label in _shapes(dynamic):
        f, y, p = _data(b_n, grid, label)
        expected = fn(f, y, p)
        got = compiled(f, y, p)
        _assert_same(got, expected)
        _assert_same(_grads(got, (f, p)), _grads(expected, (f, p)))


LABEL_CASES = {
    "dynamic": lambda f, y, p, z: dynamic_pseudo_label(
        f, p, threshold=0.2, valid=torch.arange(K) != 0, size=tuple(y.shape[-2:])
    ),
    "fuse-fill": lambda f, y, p, z: hybrid_fuse(y, dynamic_pseudo_label(f, p, threshold=0.2)),
    "fuse-agree": lambda f, y, p, z: hybrid_fuse(y, y.flip(-1), mode="agree"),
    "static": lambda f, y, p, z: static_pseudo_label(
        z, class_thresholds=torch.full((K,), 0.6), proportion=0.2
    ),
    "resize-nearest": lambda f, y, p, z: resize_labels(y, (3, 7)),
    "resize-purity": lambda f, y, p, z: resize_labels(y, (3, 7), mode="purity", num_classes=K),
}


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_ops_compile_and_match(case, dynamic):
    fn = LABEL_CASES[case]
    compiled = _compiled(fn, dynamic)
    for b_n, grid, label in _shapes(dynamic):
        f, y, p = _data(b_n, grid, label)
        z = 3 * torch.randn(b_n, K, *label)
        _assert_same(compiled(f, y, p, z), fn(f, y, p, z))


@pytest.mark.parametrize("dynamic", [False, True])
def test_stateful_updates_compile_and_match(dynamic):
    ema_c, ema_e = PrototypeEMA(K, D, momentum=0.5), PrototypeEMA(K, D, momentum=0.5)
    cbt_c, cbt_e = ClassBalancedThresholds(K, proportion=0.2), ClassBalancedThresholds(K, proportion=0.2)

    def step(ema, cbt, f, y, z):
        ema.update(f, y)
        cbt.update(z)
        return ema.prototypes.clone()

    compiled = _compiled(step, dynamic)
    for b_n, grid, label in _shapes(dynamic):
        f, y, _ = _data(b_n, grid, label)
        z = 3 * torch.randn(b_n, K, *label)
        _assert_same(compiled(ema_c, cbt_c, f.detach(), y, z), step(ema_e, cbt_e, f.detach(), y, z))
    assert torch.equal(ema_c.initialized, ema_e.initialized)
    assert torch.equal(cbt_c.histogram, cbt_e.histogram)


@pytest.mark.parametrize("dynamic", [False, True])
def test_orchestrator_with_weights_compiles_and_matches(dynamic):
    # issue 18.6: source_weight / target_weight / class_weight through the orchestrator, (B, 1, H, W) labels
    eager, model = BidirectionalContrast(K, D, threshold=0.2), BidirectionalContrast(K, D, threshold=0.2)

    def step(m, fs, ys, ft, yf):
        return m(fs, ys[:, None], ft, yf, source_weight=torch.linspace(0.5, 1.0, fs.shape[0]),
                 target_weight=(yf != 255).to(ft.dtype) * 0.7, class_weight=torch.linspace(1.0, 2.0, K))

    compiled = _compiled(step, dynamic)
    for fs, ys, ft, yf in _step_inputs(dynamic):
        out_e, out_c = step(eager, fs, ys, ft, yf), compiled(model, fs, ys, ft, yf)
        _assert_same(tuple(out_c[:5]), tuple(out_e[:5]))
        _assert_same(_grads(out_c.loss, (fs, ft)), _grads(out_e.loss, (fs, ft)))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("config", [{"threshold": 0.2, "momentum": 0.5}, {"release_compatible": True}])
def test_orchestrator_step_compiles_and_matches(config, dynamic):
    eager, model = BidirectionalContrast(K, D, **config), BidirectionalContrast(K, D, **config)
    compiled = _compiled(model, dynamic)
    for fs, ys, ft, yf in _step_inputs(dynamic):
        out_e = eager(fs, ys, ft, yf)
        out_c = compiled(fs, ys, ft, yf)
        _assert_same(tuple(out_c[:5]), tuple(out_e[:5]))
        _assert_same(out_c.stats, out_e.stats)
        _assert_same(_grads(out_c.loss, (fs, ft)), _grads(out_e.loss, (fs, ft)))
    _assert_same(model.source_ema.prototypes, eager.source_ema.prototypes)
    _assert_same(model.target_ema.prototypes, eager.target_ema.prototypes)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("config", [{"threshold": 0.2, "momentum": 0.5}, {"dynamic": False, "calibrate": False}])
def test_orchestrator_similarities_compile_and_match(config, dynamic):
    # issue 25.4: the step's cosines handed out as an attribute of StepOutput, through fullgraph compile
    eager, model = BidirectionalContrast(K, D, **config), BidirectionalContrast(K, D, **config)

    def step(m, fs, ys, ft, yf):
        return m(fs, ys, ft, yf, return_similarities=True)

    compiled = _compiled(step, dynamic)
    for fs, ys, ft, yf in _step_inputs(dynamic):
        out_e, out_c = step(eager, fs, ys, ft, yf), compiled(model, fs, ys, ft, yf)
        assert type(out_c) is type(out_e) and len(out_c) == 6
        _assert_same(tuple(out_c[:5]), tuple(out_e[:5]))
        _assert_same(tuple(out_c.similarities), tuple(out_e.similarities))
        assert out_c.similarities.cosine.shape == (ft.shape[0], K, *ft.shape[2:])
