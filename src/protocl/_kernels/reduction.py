"""The reductions of protocl's losses (``reduction`` as in ``F.cross_entropy``, an empty mean is 0)."""

from __future__ import annotations

import torch
from torch import Tensor

from .._types import Reduction


def reduce_loss(loss: Tensor, reduction: Reduction, weight: Tensor) -> Tensor:
    r"""Reduce a per-element ``loss`` that is already multiplied by its ``weight``.

    ``"mean"`` is :math:`\sum \ell / \sum w` (``F.cross_entropy``'s weighted mean); when nothing contributes
    (:math:`\sum w = 0`) it is a zero still connected to the graph, never NaN.
    """
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "sum":
        return total
    denom = weight.sum()
    return total / torch.where(denom != 0, denom, torch.ones_like(denom))


def pair_mean(loss: Tensor, weight: Tensor) -> Tensor:
    """The release's batch reduction: the mean over images (pairs) of each image's weighted mean; an image
    where nothing contributes counts 0 (its gradients are 0)."""
    num = loss.flatten(1).sum(1)
    den = weight.flatten(1).sum(1)
    return (num / torch.where(den != 0, den, torch.ones_like(den))).mean()
