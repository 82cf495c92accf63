r"""Class-wise domain-bias calibration (spec section 3) against the float64 loop reference."""

import numpy as np
import pytest
import reference as ref
import torch

from protocl import PrototypeEMA, domain_bias_calibrate

K, D = 5, 4


def _close(got, expected, **tol):
    torch.testing.assert_close(
        got.detach().double(),
        torch.as_tensor(np.asarray(expected), dtype=torch.float64),
        **(tol or {"rtol": 1e-12, "atol": 1e-12}),
    )


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_matches_reference_with_flags(lead):
    protos = torch.randn(*lead, K, D, dtype=torch.float64)
    mu_s, mu_t = torch.randn(K, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    init_s = torch.tensor([True, True, False, True, False])
    init_t = torch.tensor([True, False, True, True, False])
    got = domain_bias_calibrate(protos, mu_s, mu_t, source_initialized=init_s, target_initialized=init_t)
    assert got.shape == protos.shape and got.dtype == torch.float64
    _close(got, ref.domain_bias_calibrate(protos, mu_s, mu_t, init_s, init_t))


def test_without_flags_all_rows_are_initialised():
    protos = torch.randn(2, K, D, dtype=torch.float64)
    mu_s, mu_t = torch.randn(K, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    _close(domain_bias_calibrate(protos, mu_s, mu_t), protos + (mu_t - mu_s))


def test_accepts_prototype_ema_modules():
    src, tgt = PrototypeEMA(K, D, momentum=0.5), PrototypeEMA(K, D, momentum=0.5)
    src.update_from(torch.randn(K, D), torch.tensor([1.0, 1.0, 0.0, 2.0, 0.0]))
    tgt.update_from(torch.randn(K, D), torch.tensor([1.0, 0.0, 3.0, 1.0, 0.0]))
    protos = torch.randn(3, K, D)
    got = domain_bias_calibrate(protos, src, tgt)
    expected = ref.domain_bias_calibrate(
        protos, src.prototypes, tgt.prototypes, src.initialized, tgt.initialized
    )
    _close(got, expected, rtol=1e-6, atol=1e-6)
    # only classes 0 and 3 are initialised in both
    assert torch.equal(got[:, [1, 2, 4]], protos[:, [1, 2, 4]])


def test_fresh_emas_leave_prototypes_unchanged():
    protos = torch.randn(2, K, D)
    got = domain_bias_calibrate(protos, PrototypeEMA(K, D), PrototypeEMA(K, D))
    assert torch.equal(got, protos)


def test_gradients_flow_into_source_prototypes_only():
    protos = torch.randn(2, K, D, dtype=torch.float64, requires_grad=True)
    mu_s, mu_t = torch.randn(K, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: domain_bias_calibrate(p, mu_s, mu_t), (protos,), fast_mode=True)


def test_half_prototypes():
    protos = torch.randn(2, K, D).to(torch.bfloat16)
    mu_s, mu_t = torch.randn(K, D), torch.randn(K, D)
    got = domain_bias_calibrate(protos, mu_s, mu_t)
    torch.testing.assert_close(got.float(), protos.float() + mu_t - mu_s, rtol=2e-2, atol=2e-2)
