r"""Entropy loss (spec section 3) against the float64 loop reference."""

import math

import numpy as np
import pytest
import reference as ref
import torch

from protocl import EntropyLoss, entropy_loss


def _close(got, expected, rtol=1e-10, atol=1e-12):
    torch.testing.assert_close(
        got.detach().cpu().double(),
        torch.as_tensor(np.asarray(expected), dtype=torch.float64),
        rtol=rtol,
        atol=atol,
    )


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("scale", [0.1, 3.0, 100.0])
def test_entropy_matches_reference(reduction, scale, device):
    logits = scale * torch.randn(2, 5, 4, 3, dtype=torch.float64)
    got = entropy_loss(logits.to(device), reduction=reduction)
    assert got.shape == ((2, 4, 3) if reduction == "none" else ())
    assert got.dtype == torch.float64
    _close(got, ref.entropy(logits, reduction))


def test_entropy_known_values():
    assert math.isclose(entropy_loss(torch.zeros(1, 7, 2, 2)).item(), math.log(7), rel_tol=1e-6)
    onehot = torch.full((1, 3, 2, 2), -1e4)
    onehot[:, 1] = 1e4
    assert entropy_loss(onehot).item() == 0.0


def test_entropy_is_shannon_not_double_softmax():
    # the release applies softmax twice (a bug): it would give a much larger value for peaked logits
    logits = torch.tensor([10.0, 0.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    p = torch.softmax(logits, 1)
    expected = -(p * p.log()).sum()
    _close(entropy_loss(logits), expected)


def test_entropy_saturated_logits_finite_grads():
    # log(0) -> NaN is a peer mistake: +-1000 logits give exact zeros in softmax
    logits = torch.randn(2, 4, 3, 3, dtype=torch.float64) * 1000
    logits.requires_grad_(True)
    loss = entropy_loss(logits)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logits.grad))
    _close(loss, ref.entropy(logits), rtol=1e-6, atol=1e-9)


def test_entropy_gradcheck():
    logits = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: entropy_loss(z), (logits,), fast_mode=True)
    assert torch.autograd.gradcheck(lambda z: entropy_loss(z, reduction="none"), (logits,), fast_mode=True)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_entropy_module_equals_function(reduction):
    logits = torch.randn(2, 4, 3, 5)
    torch.testing.assert_close(
        EntropyLoss(reduction=reduction)(logits), entropy_loss(logits, reduction=reduction)
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_entropy_half_inputs_close_to_fp32(dtype):
    logits = (3 * torch.randn(2, 19, 8, 8)).to(dtype)
    got = entropy_loss(logits)
    assert got.dtype in (torch.float32, dtype)
    torch.testing.assert_close(got.float(), entropy_loss(logits.float()), rtol=1e-3, atol=1e-3)


def test_entropy_non_contiguous_and_single_class():
    logits = torch.randn(2, 3, 4, 5, dtype=torch.float64).permute(0, 3, 1, 2)  # (2, 5, 3, 4)
    _close(entropy_loss(logits), ref.entropy(logits))
    assert entropy_loss(torch.randn(2, 1, 3, 3)).item() == 0.0


def test_entropy_masked_classes_at_minus_infinity():
    # a class masked with logit -inf has probability exactly 0: 0 log 0 = 0, no NaN in the loss or its gradient
    logits = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    masked = logits.clone()
    masked[:, 3] = -math.inf
    masked.requires_grad_(True)
    loss = entropy_loss(masked)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(masked.grad))
    assert torch.all(masked.grad[:, 3] == 0)
    # equal to the entropy over the remaining four classes (the loop reference on the smaller logits)
    _close(loss, ref.entropy(logits[:, [0, 1, 2, 4]]))
    per_pixel = entropy_loss(masked.detach(), reduction="none")
    _close(per_pixel, ref.entropy(logits[:, [0, 1, 2, 4]], "none"))
