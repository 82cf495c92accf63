"""Entropy minimisation loss (the protocl method spec, §3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._kernels.dtypes import no_autocast, upcast
from ._kernels.reduction import reduce_loss
from ._types import Reduction
from ._validation import check_float_tensor, check_reduction, report_pending

__all__ = ["entropy_loss", "EntropyLoss"]


def entropy_loss(logits: Tensor, *, reduction: Reduction = "mean") -> Tensor:
    r"""Shannon entropy of the class distribution of every pixel.

    .. math::
        H(p) = -\sum_k \operatorname{softmax}(z)_k(p) \, \log \operatorname{softmax}(z)_k(p)

    computed from ``log_softmax`` (one softmax), with :math:`0 \log 0 = 0`: a probability that is exactly 0 —
    a class masked with a logit of ``-inf``, or one underflowed by saturated logits — adds nothing, and neither
    the loss nor its gradient is ever NaN. ``"mean"`` averages over all ``B·H·W`` pixels.

    Args:
        logits: ``Tensor[B, K, H, W]`` (fp16/bf16 computed in fp32; fp64 stays fp64).
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.

    Returns:
        A scalar, or ``Tensor[B, H, W]`` with ``reduction="none"``.

    Shape:
        - logits: :math:`(B, K, H, W)`; output: scalar or :math:`(B, H, W)`

    Example:
        >>> z = torch.zeros(1, 4, 2, 2, requires_grad=True)
        >>> loss = entropy_loss(z)  # uniform over 4 classes: log 4
        >>> torch.allclose(loss, torch.tensor(4.0).log())
        True
        >>> loss.backward()
    """
    report_pending()
    check_float_tensor(logits, "logits", (4,), "(B, K, H, W)")
    check_reduction(reduction)
    with no_autocast(logits):
        logp = torch.log_softmax(upcast(logits), dim=1)
        p = logp.exp()
        # where p is 0, log p may be -inf (a masked class): the where keeps it out of the product and, since its
        # gradient there is 0, out of the backward too
        ent = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)  # b h w
    return reduce_loss(ent, reduction, torch.ones_like(ent))


class EntropyLoss(nn.Module):
    r"""Module form of :func:`entropy_loss`.

    Shape:
        - logits: :math:`(B, K, H, W)`; output: scalar or :math:`(B, H, W)`

    Example:
        >>> EntropyLoss()(torch.randn(2, 3, 4, 4)).shape
        torch.Size([])
    """

    def __init__(self, *, reduction: Reduction = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

    def forward(self, logits: Tensor) -> Tensor:
        return entropy_loss(logits, reduction=self.reduction)
