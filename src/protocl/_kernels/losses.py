"""Entropy of the class distribution of every pixel (see :func:`protocl.entropy_loss`)."""

from __future__ import annotations

import torch
from torch import Tensor

from .dtypes import no_autocast, upcast


def entropy(logits: Tensor) -> Tensor:
    r"""Per-pixel :math:`-\sum_k p_k \log p_k` ``(B, H, W)`` from ``log_softmax``, with :math:`0 \log 0 = 0`."""
    with no_autocast(logits):
        logp = torch.log_softmax(upcast(logits), dim=1)
        p = logp.exp()
        # where p is 0, log p may be -inf (a masked class): the where keeps it out of the product and, since its
        # gradient there is 0, out of the backward too
        return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)  # b h w
