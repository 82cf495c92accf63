"""Class-wise domain-bias calibration of source prototypes (the protocl method spec, §3)."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor

from ._kernels.prototypes import calibrate
from ._validation import check_bool_tensor, check_float_tensor, check_same_device, report_pending, shape_equals
from .prototypes import PrototypeEMA

__all__ = ["domain_bias_calibrate"]

EMAOrTensor = Union[Tensor, PrototypeEMA]


def _ema_state(ema: Any, initialized: Optional[Tensor], name: str, init_name: str) -> Tuple[Tensor, Optional[Tensor]]:
    if isinstance(ema, PrototypeEMA):
        if initialized is not None:
            raise ValueError(f"{init_name}: expected None when {name} is a PrototypeEMA (it has its own), got a tensor")
        return ema.prototypes, ema.initialized
    check_float_tensor(ema, name, (2,), "(K, D)")
    if initialized is not None:
        check_bool_tensor(initialized, init_name, (1,), "(K,)")
        if initialized.shape[0] != ema.shape[0]:
            raise ValueError(f"{init_name}: expected shape ({ema.shape[0]},) to match {name}, got {tuple(initialized.shape)}")
    return ema, initialized


def domain_bias_calibrate(
    source_prototypes: Tensor,
    source_ema: EMAOrTensor,
    target_ema: EMAOrTensor,
    *,
    source_initialized: Optional[Tensor] = None,
    target_initialized: Optional[Tensor] = None,
) -> Tensor:
    r"""Shift source prototypes towards the target domain by the class-wise domain bias of the EMAs.

    .. math::
        \xi(k) = \mu_T(k) - \mu_S(k) \quad (0 \text{ where either EMA is not initialised}), \qquad
        \mathbf{p}_{S\to T}(k) = \mathbf{p}_S(k) + \xi(k)

    Args:
        source_prototypes: ``Tensor[..., K, D]`` source prototypes (e.g. per image ``(B, K, D)``).
        source_ema: source EMA prototypes ``Tensor[K, D]`` or a :class:`~protocl.PrototypeEMA`.
        target_ema: target EMA prototypes ``Tensor[K, D]`` or a :class:`~protocl.PrototypeEMA`.
        source_initialized: ``Tensor[K]`` bool, which source EMA rows are initialised (None: all; must be None
            when ``source_ema`` is a module, which carries its own).
        target_initialized: likewise for the target EMA.

    Returns:
        ``Tensor[..., K, D]`` calibrated prototypes (gradients flow into ``source_prototypes``; the EMAs are
        state). dtype: the promotion of the inputs (fp64 stays fp64).

    Shape:
        - source_prototypes: :math:`(..., K, D)`; EMAs: :math:`(K, D)`; output: :math:`(..., K, D)`

    Example:
        >>> mu_s, mu_t = torch.zeros(3, 4), torch.ones(3, 4)
        >>> done = torch.tensor([True, True, False])
        >>> domain_bias_calibrate(torch.zeros(2, 3, 4), mu_s, mu_t, target_initialized=done)[0, :, 0]
        tensor([1., 1., 0.])
    """
    report_pending()
    check_float_tensor(source_prototypes, "source_prototypes", (2, 3, 4, 5), "(..., K, D)")
    mu_s, init_s = _ema_state(source_ema, source_initialized, "source_ema", "source_initialized")
    mu_t, init_t = _ema_state(target_ema, target_initialized, "target_ema", "target_initialized")
    K, D = source_prototypes.shape[-2:]
    for name, mu in (("source_ema", mu_s), ("target_ema", mu_t)):
        if not shape_equals(mu.shape, (K, D)):
            raise ValueError(
                f"{name}: expected shape {(K, D)} (K, D of source_prototypes {tuple(source_prototypes.shape)}), "
                f"got {tuple(mu.shape)}"
            )
        check_same_device("source_prototypes", source_prototypes, name, mu)
    return calibrate(source_prototypes, mu_s, mu_t, init_s, init_t)
