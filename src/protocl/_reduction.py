"""The single reduction helper of protocl (``reduction`` as in ``F.cross_entropy``, empty mean = 0)."""

from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_choice

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction) -> str:
    return check_choice(reduction, "reduction", REDUCTIONS)


def reduce_loss(loss: Tensor, reduction: str, weight: Tensor) -> Tensor:
    r"""Reduce a per-element ``loss`` that is already multiplied by its ``weight``.

    ``weight`` holds each element's weight (its class weight, 0 where it does not contribute).
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
