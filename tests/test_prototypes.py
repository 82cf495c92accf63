r"""Masked average pooling and the prototype EMA (spec section 3) against the float64 loop reference."""

import copy

import numpy as np
import pytest
import reference as ref
import torch

from protocl import PrototypeEMA, masked_average_pool

TOL = {"rtol": 1e-10, "atol": 1e-12}  # float64 end to end


def _t(arr):
    return torch.from_numpy(np.ascontiguousarray(arr))


# ------------------------------------------------------------------------------ masked_average_pool
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize(("grid", "label_size"), [((5, 6), (5, 6)), ((4, 5), (11, 13)), ((6, 4), (3, 9))])
def test_map_matches_reference(per_image, grid, label_size, device):
    feats = torch.randn(3, 4, *grid, dtype=torch.float64, device=device)
    labels = ref.random_labels(3, *label_size, 7).to(device)
    protos, counts = masked_average_pool(feats, labels, 7, per_image=per_image)
    exp_p, exp_c = ref.masked_average_pool(feats, labels, 7, per_image=per_image)
    assert protos.dtype == torch.float64
    assert protos.shape == exp_p.shape and counts.shape == exp_c.shape
    torch.testing.assert_close(protos.cpu(), _t(exp_p), **TOL)
    torch.testing.assert_close(counts.cpu().double(), _t(exp_c), **TOL)


@pytest.mark.parametrize("weight_grid", ["feature", "label"])
def test_map_weights_match_reference(weight_grid):
    feats = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    labels = ref.random_labels(2, 9, 11, 5)
    shape = (2, 4, 5) if weight_grid == "feature" else (2, 9, 11)
    weights = torch.rand(shape, dtype=torch.float64)
    weights[0, 0] = 0.0  # zero weights are allowed
    for per_image in (True, False):
        protos, counts = masked_average_pool(feats, labels, 5, weights=weights, per_image=per_image)
        exp_p, exp_c = ref.masked_average_pool(feats, labels, 5, weights=weights, per_image=per_image)
        torch.testing.assert_close(protos, _t(exp_p), **TOL)
        torch.testing.assert_close(counts.double(), _t(exp_c), **TOL)


def test_map_purity_resize_matches_reference():
    feats = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    labels = ref.blocky_labels(2, 12, 12, 4, block=3)
    protos, counts = masked_average_pool(feats, labels, 4, resize="purity", min_purity=0.75)
    exp_p, exp_c = ref.masked_average_pool(feats, labels, 4, resize="purity", min_purity=0.75)
    torch.testing.assert_close(protos, _t(exp_p), **TOL)
    torch.testing.assert_close(counts.double(), _t(exp_c), **TOL)


def test_map_absent_classes_are_zero_with_zero_count():
    feats = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    labels = ref.random_labels(2, 4, 4, 6, present=[1, 4])
    protos, counts = masked_average_pool(feats, labels, 6)
    absent = torch.tensor([0, 2, 3, 5])
    assert torch.all(counts[:, absent] == 0)
    assert torch.all(protos[:, absent] == 0)
    assert torch.all(torch.isfinite(protos))


def test_map_keeps_class_zero_and_counts_per_class():
    # peer mistakes: dropping class 0 (road); counting all pixels instead of the class's pixels
    feats = torch.arange(2 * 4, dtype=torch.float64).reshape(1, 2, 2, 2)
    labels = torch.tensor([[[0, 0], [0, 1]]])
    protos, counts = masked_average_pool(feats, labels, 2)
    assert counts.tolist() == [[3.0, 1.0]]
    torch.testing.assert_close(protos[0, 0], torch.tensor([1.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(protos[0, 1], torch.tensor([3.0, 7.0], dtype=torch.float64))


def test_map_ignore_pixels_not_counted():
    feats = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2] = 2
    protos, counts = masked_average_pool(feats, labels, 3)
    assert counts.tolist() == [[0.0, 0.0, 8.0]]
    torch.testing.assert_close(protos[0, 2], feats[0, :, :2].mean((1, 2)))


def test_map_all_ignored_gives_zeros():
    feats = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    protos, counts = masked_average_pool(feats, torch.full((2, 8, 8), 255), 5)
    assert torch.all(protos == 0) and torch.all(counts == 0)
    protos.sum().backward()
    assert torch.all(feats.grad == 0)


def test_map_one_class_equals_spatial_mean():
    feats = torch.randn(2, 5, 3, 7, dtype=torch.float64)
    protos, counts = masked_average_pool(feats, torch.full((2, 6, 14), 3), 4)
    torch.testing.assert_close(protos[:, 3], feats.mean((2, 3)))
    assert torch.all(counts[:, 3] == 21) and torch.all(counts[:, :3] == 0)


def test_map_no_hard_coded_sizes():
    # K = 300 (> 256), D = 1, B = 5, odd grids: nothing is specialised to 19 classes / 256 channels / batch 2
    feats = torch.randn(5, 1, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, 300, (5, 7, 9))
    protos, counts = masked_average_pool(feats, labels, 300, ignore_index=-1)
    exp_p, exp_c = ref.masked_average_pool(feats, labels, 300, ignore_index=-1)
    assert protos.shape == (5, 300, 1)
    torch.testing.assert_close(protos, _t(exp_p), **TOL)
    torch.testing.assert_close(counts.double(), _t(exp_c), **TOL)


def test_map_ignore_index_inside_class_range_is_not_a_class():
    # with K > 255 the default ignore_index 255 is still "no class" (ignore pixels never form a class)
    feats = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    labels = torch.full((1, 4, 4), 255)
    labels[0, 0] = 7
    protos, counts = masked_average_pool(feats, labels, 300)
    assert counts[0, 255].item() == 0 and torch.all(protos[0, 255] == 0)
    assert counts[0, 7].item() == 4


def test_map_non_contiguous_inputs():
    feats = torch.randn(2, 5, 6, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # (B, D, h, w) view
    labels = ref.random_labels(2, 13, 11, 4).transpose(1, 2)  # (B, 11, 13) view
    assert not feats.is_contiguous() and not labels.is_contiguous()
    protos, counts = masked_average_pool(feats, labels, 4)
    exp_p, exp_c = ref.masked_average_pool(feats, labels, 4)
    torch.testing.assert_close(protos, _t(exp_p), **TOL)
    torch.testing.assert_close(counts.double(), _t(exp_c), **TOL)


def test_map_gradcheck():
    feats = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    labels = ref.random_labels(2, 5, 7, 4)
    weights = torch.rand(2, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda f: masked_average_pool(f, labels, 4, weights=weights).prototypes, (feats,), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda f: masked_average_pool(f, labels, 4, per_image=False).prototypes, (feats,), fast_mode=True
    )


def test_map_no_gradient_into_weights():
    feats = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(1, 3, 3, dtype=torch.float64, requires_grad=True)
    protos, _ = masked_average_pool(feats, torch.randint(0, 2, (1, 3, 3)), 2, weights=weights)
    grad_w = torch.autograd.grad(protos.sum(), weights, allow_unused=True)[0]
    assert grad_w is None or torch.all(grad_w == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_map_half_inputs_close_to_fp32(dtype):
    feats = torch.randn(2, 4, 6, 6).to(dtype)
    labels = ref.random_labels(2, 12, 12, 5)
    protos, _ = masked_average_pool(feats, labels, 5)
    expected, _ = masked_average_pool(feats.float(), labels, 5)
    assert protos.dtype in (torch.float32, dtype)
    torch.testing.assert_close(protos.float(), expected, rtol=1e-2, atol=1e-2)


def test_map_half_inputs_accumulate_in_fp32():
    # 64*64 fp16 values of 1000 sum to 4.1e6, far above fp16's max (65504): only fp32 sums stay finite
    feats = torch.full((1, 2, 64, 64), 1000.0, dtype=torch.float16)
    protos, counts = masked_average_pool(feats, torch.zeros(1, 64, 64, dtype=torch.int64), 1)
    assert torch.all(torch.isfinite(protos))
    torch.testing.assert_close(protos.float(), torch.full((1, 1, 2), 1000.0))
    assert counts.float().item() == 4096


def test_map_has_no_feature_times_class_temporary():
    b_n, k_n, dim, grid = 2, 8, 16, (16, 16)
    feats = torch.randn(b_n, dim, *grid, requires_grad=True)
    labels = ref.random_labels(b_n, 32, 32, k_n)
    with ref.LargestFloatProbe() as probe:
        masked_average_pool(feats, labels, k_n).prototypes.sum().backward()
    assert probe.largest < b_n * k_n * dim * grid[0] * grid[1] // 4  # (B, K, D, h, w) would be 65536


def test_map_returns_named_tuple():
    out = masked_average_pool(torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.int64), 2)
    protos, counts = out
    assert out.prototypes is protos and out.counts is counts


# -------------------------------------------------------------------------------------- PrototypeEMA
def _batches(n, b_n=2, dim=3, k_n=5, grid=(4, 4), label_size=(7, 9)):
    r"""``n`` (features, labels) batches in which classes appear at different steps."""
    out = []
    for step in range(n):
        feats = torch.randn(b_n, dim, *grid, dtype=torch.float64)
        present = [c for c in range(k_n) if (c + step) % 3 != 0]
        out.append((feats, ref.random_labels(b_n, *label_size, k_n, present=present)))
    return out


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_ema_update_sequence_matches_reference(momentum):
    ema = PrototypeEMA(5, 3, momentum=momentum).double()
    expected = ref.EMARef(5, 3, momentum)
    for feats, labels in _batches(5):
        ema.update(feats, labels)
        expected.update(feats, labels)
        torch.testing.assert_close(ema.prototypes.double(), _t(expected.prototypes), rtol=1e-6, atol=1e-6)
        assert ema.initialized.tolist() == expected.initialized.tolist()


@pytest.mark.parametrize("min_purity", [0.4, 0.75, 0.95])
def test_ema_update_with_purity_resize_matches_reference(min_purity):
    ema = PrototypeEMA(4, 3, momentum=0.5).double()
    expected = ref.EMARef(4, 3, 0.5)
    for _ in range(3):
        feats = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        labels = ref.blocky_labels(2, 13, 11, 4, block=3)  # non-integer ratios: mixed cells
        ema.update(feats, labels, resize="purity", min_purity=min_purity)
        protos, counts = ref.masked_average_pool(
            feats, labels, 4, per_image=False, resize="purity", min_purity=min_purity
        )
        expected.update_from(protos, counts)
        torch.testing.assert_close(ema.prototypes, _t(expected.prototypes), rtol=1e-10, atol=1e-12)
        assert ema.initialized.tolist() == expected.initialized.tolist()


def test_ema_buffers_are_fp32_and_registered():
    ema = PrototypeEMA(4, 6)
    assert ema.prototypes.dtype == torch.float32 and ema.prototypes.shape == (4, 6)
    assert ema.initialized.dtype == torch.bool and ema.initialized.shape == (4,)
    assert set(ema.state_dict()) >= {"prototypes", "initialized"}
    assert not ema.initialized.any()
    assert ema() is ema.prototypes or torch.equal(ema(), ema.prototypes)


@pytest.mark.parametrize("per_image", [True, False])
def test_ema_update_from_matches_update(per_image):
    a, b = PrototypeEMA(5, 3, momentum=0.8), PrototypeEMA(5, 3, momentum=0.8)
    expected = ref.EMARef(5, 3, 0.8)
    for feats, labels in _batches(4):
        pooled = masked_average_pool(feats, labels, 5, per_image=per_image)
        a.update_from(pooled.prototypes, pooled.counts)
        b.update(feats, labels)
        expected.update(feats, labels)
        torch.testing.assert_close(a.prototypes, b.prototypes, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.prototypes.double(), _t(expected.prototypes), rtol=1e-5, atol=1e-6)
        assert torch.equal(a.initialized, b.initialized)


def test_ema_first_sight_copies_and_absent_untouched():
    ema = PrototypeEMA(3, 2, momentum=0.9)
    ema.update_from(torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]), torch.tensor([2.0, 0.0, 1.0]))
    torch.testing.assert_close(ema.prototypes, torch.tensor([[1.0, 2.0], [0.0, 0.0], [5.0, 5.0]]))
    assert ema.initialized.tolist() == [True, False, True]
    ema.update_from(torch.tensor([[3.0, 4.0], [7.0, 8.0], [9.0, 9.0]]), torch.tensor([1.0, 4.0, 0.0]))
    # class 0 blends, class 1 is seen for the first time (copied, not blended with zeros), class 2 untouched
    torch.testing.assert_close(ema.prototypes, torch.tensor([[1.2, 2.2], [7.0, 8.0], [5.0, 5.0]]))
    assert ema.initialized.tolist() == [True, True, True]


def test_ema_momentum_does_not_depend_on_counts():
    # peer mistake: count-weighted "momentum" that freezes prototypes late in training
    ema = PrototypeEMA(1, 1, momentum=0.9)
    for _ in range(50):
        ema.update_from(torch.tensor([[0.0]]), torch.tensor([1e6]))
    ema.update_from(torch.tensor([[1.0]]), torch.tensor([1.0]))
    torch.testing.assert_close(ema.prototypes, torch.tensor([[0.1]]))


def test_ema_state_dict_round_trip():
    ema = PrototypeEMA(5, 3, momentum=0.7)
    batches = _batches(4)
    for feats, labels in batches[:2]:
        ema.update(feats, labels)
    clone = PrototypeEMA(5, 3, momentum=0.7)
    clone.load_state_dict(copy.deepcopy(ema.state_dict()))
    assert torch.equal(clone.prototypes, ema.prototypes) and torch.equal(clone.initialized, ema.initialized)
    for feats, labels in batches[2:]:
        ema.update(feats, labels)
        clone.update(feats, labels)
    assert torch.equal(clone.prototypes, ema.prototypes) and torch.equal(clone.initialized, ema.initialized)


def test_ema_update_has_no_grad_and_forward_is_pure():
    ema = PrototypeEMA(3, 2, momentum=0.5)
    feats = torch.randn(1, 2, 3, 3, requires_grad=True)
    ema.update(feats, torch.randint(0, 3, (1, 3, 3)))
    assert not ema.prototypes.requires_grad
    before = ema.prototypes.clone()
    for _ in range(3):
        ema()
    assert torch.equal(ema.prototypes, before)


def test_ema_buffer_size_independent_of_data():
    ema = PrototypeEMA(4, 3)
    sizes = {n: t.numel() for n, t in ema.state_dict().items()}
    ema.update(torch.randn(3, 3, 32, 32), torch.randint(0, 4, (3, 64, 64)))
    assert {n: t.numel() for n, t in ema.state_dict().items()} == sizes
