"""Masked average pooling, the prototype EMA blend and the domain-bias calibration (see :mod:`protocl.prototypes`,
:mod:`protocl.calibration`)."""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._types import ResizeMode
from .dtypes import compute_dtype, no_autocast
from .resize import grid_of, nearest_gather, resize_labels


class _ClassSums(torch.autograd.Function):
    """``(features (B, D, h, w), member (B, K, N)) -> member @ f^T (B, K, D)``, differentiable in the features.

    Autograd's own ``bmm`` would hand the features' gradient back either in the slower orientation of the
    forward product or as a transposed view (a full copy later); here the forward reads the features as
    ``(B, N, D)`` (a transposed view) and the backward writes their gradient directly in their own layout, as a
    fresh tensor of their shape, so that autograd adds other terms' gradients into it in place.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, member: Tensor) -> Tensor:
        ctx.save_for_backward(member)
        ctx.shape = features.shape
        f = features.reshape(features.shape[0], features.shape[1], -1)
        return torch.bmm(member, f.transpose(1, 2))  # b k n @ b n d -> b k d

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tuple[Tensor, None]:
        (member,) = ctx.saved_tensors
        grad = torch.empty(ctx.shape, dtype=g.dtype, device=g.device)
        torch.bmm(g.transpose(1, 2), member, out=grad.view(g.shape[0], g.shape[2], -1))  # b d k @ b k n
        return grad, None


def class_sums(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int,
    weights: Optional[Tensor],
    resize: ResizeMode,
    min_purity: float,
) -> Tuple[Tensor, Tensor]:
    r"""Per-image class sums :math:`\sum_p [y=k]\, w\, \mathbf{f}` ``(B, K, D)`` and counts
    :math:`\sum_p [y=k]\, w` ``(B, K)`` in fp32/fp64, of features ``(B, D, h, w)`` under labels ``(B, H, W)``
    resized to the feature grid; ``weights`` on the feature or the label grid.

    One batched matrix product of the (weighted) class indicator ``(B, K, N)`` with the features ``(B, D, N)``;
    its backward is one more (the gradient of the features, ``(B, D, K) @ (B, K, N)``, written in their layout).
    Ignored pixels match no class, so they vanish from both.
    """
    grid = grid_of(features)
    y = resize_labels(labels.long(), grid, resize, num_classes, ignore_index, min_purity)
    dtype = compute_dtype(features)
    classes = torch.arange(num_classes, device=y.device)
    y = rearrange(y, "b h w -> b 1 (h w)")
    y = torch.where(y == ignore_index, -1, y)  # ignore never matches a class, even when ignore_index < K
    member = (y == classes[None, :, None]).to(dtype)  # b k n
    if weights is not None:
        if tuple(weights.shape[-2:]) != grid:
            weights = nearest_gather(weights, grid)
        member = member * rearrange(weights.detach().to(dtype), "b h w -> b 1 (h w)")
    with no_autocast(features):
        sums = _ClassSums.apply(features.to(dtype), member)  # b k d
    return sums, member.sum(-1)


def divide_counts(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums / counts`` per class, 0 where the count is 0 (branch-free)."""
    present = counts > 0
    safe = torch.where(present, counts, torch.ones_like(counts))
    return torch.where(present[..., None], sums / safe[..., None], torch.zeros_like(sums))


def batch_sums(prototypes: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-class feature sums ``(K, D)`` and counts ``(K,)`` of per-image ``(B, K, D)`` or pooled ``(K, D)``
    prototypes (the inverse of the division, fp32/fp64, detached)."""
    dtype = compute_dtype(prototypes, counts)
    c = counts.detach().to(dtype)
    sums = prototypes.detach().to(dtype) * c[..., None]
    if sums.ndim == 3:
        sums, c = sums.sum(0), c.sum(0)
    return sums, c


def ema_blend(
    prototypes: Tensor, initialized: Tensor, sums: Tensor, counts: Tensor, momentum: float
) -> Tuple[Tensor, Tensor]:
    r"""The EMA update as a pure function: new ``(prototypes, initialized)`` from the batch sums and counts.

    :math:`\mu_k \leftarrow m_k` on first sight, :math:`\lambda \mu_k + (1 - \lambda) m_k` after, untouched where
    the count is 0.
    """
    batch = divide_counts(sums, counts).to(prototypes.dtype)
    seen = counts > 0
    blended = torch.where(initialized[:, None], momentum * prototypes + (1.0 - momentum) * batch, batch)
    return torch.where(seen[:, None], blended, prototypes), initialized | seen


def calibrate(
    source_prototypes: Tensor,
    source_ema: Tensor,
    target_ema: Tensor,
    source_initialized: Optional[Tensor],
    target_initialized: Optional[Tensor],
) -> Tensor:
    r""":math:`p_S + \xi`, :math:`\xi(k) = \mu_T(k) - \mu_S(k)` where both EMAs are initialised, else 0."""
    both = torch.ones(source_ema.shape[0], dtype=torch.bool, device=source_ema.device)
    if source_initialized is not None:
        both = both & source_initialized
    if target_initialized is not None:
        both = both & target_initialized
    bias = torch.where(both[:, None], target_ema - source_ema, torch.zeros_like(target_ema))
    return source_prototypes + bias.to(torch.promote_types(bias.dtype, source_prototypes.dtype))
