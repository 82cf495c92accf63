r"""The pixel-prototype cosine with a fused backward (see :func:`protocl.cosine_similarity_map`).

.. math::
    s_{bkn} = \mathbf{P}_{bk}^\top \mathbf{f}_{bn} \; \rho_{bk} \, \phi_{bn}, \qquad
    \rho_{bk} = 1 / \max(\lVert \mathbf{P}_{bk} \rVert, \epsilon), \quad
    \phi_{bn} = 1 / \max(\lVert \mathbf{f}_{bn} \rVert, \epsilon)

Written as an autograd Function so that the features ``(B, D, N)`` — the large operand (D = 2048 for layer4
features) — are never normalised, squared or copied: the forward reads them twice (one norm pass, one batched
matrix product), and the backward writes their gradient with one batched matrix product and corrects it in place
with one fused multiply-add,

.. math::
    \frac{\partial L}{\partial \mathbf{f}_{bn}} = \phi_{bn} \sum_k g_{bkn} \rho_{bk} \mathbf{P}_{bk}
        - \mathbf{f}_{bn} \, \phi_{bn}^2 \sum_k g_{bkn} s_{bkn}, \qquad
    \frac{\partial L}{\partial \mathbf{P}_{bk}} = \rho_{bk} \sum_n g_{bkn} \phi_{bn} \mathbf{f}_{bn}
        - \mathbf{P}_{bk} \, \rho_{bk}^2 \sum_n g_{bkn} s_{bkn}

(the second terms vanish where a norm is floored at :math:`\epsilon`, as the derivative of a constant).
Autograd's generic form of the same maths runs about ten elementwise passes over the features.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dtypes import compute_dtype


_CHUNK = 64  # channels per step of the features' squared norm: a cache-sized temporary


def inverse_norm(x: Tensor, dim: int, eps: float) -> Tensor:
    r""":math:`1 / \max(\lVert x \rVert, \epsilon)` along ``dim``.

    Over the channels of ``(B, D, N)`` features (``dim=1``, a strided reduction that ``vector_norm`` runs several
    times slower than a contiguous one on CPU) the squares are summed ``_CHUNK`` channels at a time, so that no
    feature-sized temporary is ever written.
    """
    if dim != 1 or x.ndim != 3 or x.shape[1] <= _CHUNK:
        squared = torch.linalg.vector_norm(x, dim=dim).square()
    else:
        squared = sum(chunk.square().sum(1) for chunk in x.split(_CHUNK, dim=1))
    return squared.clamp_min(eps * eps).rsqrt()


def _unfloored(inv: Tensor, eps: float) -> Tensor:
    """``inv ** 2`` where the norm is above ``eps`` (the floor is a constant: no gradient through it), else 0."""
    return torch.where(inv * eps < 1, inv * inv, torch.zeros_like(inv))


class _Cosine(torch.autograd.Function):
    r"""``(features (B, D, h, w), P (B, K, D) | (K, D), phi (B, N), rho (B, K) | (K,)) -> s (B, K, N)``.

    ``phi`` and ``rho`` are the inverse norms of the features and of ``P`` (computed by the caller, detached; the
    backward differentiates through them analytically). The features enter in their own 4-d shape and their
    gradient leaves as a fresh tensor of that shape (not a view): autograd then adds the gradient of another term
    (e.g. the prototypes pooled from the same features) into it in place instead of allocating a sum.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, p: Tensor, phi: Tensor, rho: Tensor, eps: float) -> Tensor:
        f = features.reshape(features.shape[0], features.shape[1], -1)  # b d (h w), a view when contiguous
        s = torch.matmul(p, f)  # (b) k d @ b d n -> b k n
        s.mul_(rho[..., None]).mul_(phi[:, None, :])
        ctx.save_for_backward(features, p, phi, rho, s)
        ctx.eps = eps
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], None, None, None]:
        features, p, phi, rho, s = ctx.saved_tensors
        eps = ctx.eps
        B, D = features.shape[:2]
        f = features.reshape(B, D, -1)
        gs = g * s  # b k n
        g_scaled = g * rho[..., None] * phi[:, None, :]  # b k n
        grad_features = grad_p = None
        if ctx.needs_input_grad[0]:
            grad_features = torch.empty(features.shape, dtype=g.dtype, device=g.device)
            grad_f = grad_features.view(B, D, -1)
            torch.bmm(p.transpose(-1, -2).expand(B, D, p.shape[-2]), g_scaled, out=grad_f)  # b d k @ b k n
            grad_f.addcmul_(f, (gs.sum(1) * _unfloored(phi, eps))[:, None, :], value=-1.0)
        if ctx.needs_input_grad[1]:
            grad_p = torch.bmm(g_scaled, f.transpose(1, 2))  # b k n @ b n d -> b k d
            radial = gs.sum(-1) * _unfloored(rho, eps)  # (b) k, per image before the shared sum below
            if p.ndim == 2:
                grad_p, radial = grad_p.sum(0), radial.sum(0)
            grad_p.addcmul_(p, radial[..., None], value=-1.0)
        return grad_features, grad_p, None, None, None


def cosine(features: Tensor, p: Tensor, eps: float, phi: Optional[Tensor] = None) -> Tensor:
    r"""Cosine ``(B, K, N)`` of features ``(B, D, h, w)`` with prototypes ``(B, K, D)``/``(K, D)``, both in the
    compute dtype; ``phi`` reuses the features' inverse norms ``(B, N)`` of an earlier call."""
    if phi is None:
        phi = feature_inverse_norm(features, eps)
    rho = inverse_norm(p.detach(), -1, eps)
    return _Cosine.apply(features, p, phi, rho, eps)


def validity(prototypes: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``valid`` if given, else the rule of every op that takes prototypes without it: a prototype is valid unless
    it is all zeros (what :func:`protocl.masked_average_pool` writes for an absent class; a zero vector has no
    direction). ``(B, K)`` or ``(K,)`` bool."""
    if valid is not None:
        return valid
    return prototypes.detach().ne(0).any(-1)


def compute_features(features: Tensor, *others: Optional[Tensor]) -> Tensor:
    """``(B, D, h, w)`` features in the compute dtype of ``features`` and ``others`` (fp32, or fp64)."""
    return features.to(compute_dtype(features, *others))


def feature_inverse_norm(features: Tensor, eps: float) -> Tensor:
    """``(B, N)`` inverse norms of ``(B, D, h, w)`` features (no gradient), to share between calls."""
    return inverse_norm(features.detach().reshape(features.shape[0], features.shape[1], -1), 1, eps)
