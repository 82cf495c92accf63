"""Target pseudo labels: dynamic (prototype matching), their fusion with static labels, classifier confidences,
static labels and class-balanced thresholds (see :mod:`protocl.pseudo_labels`)."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .._types import DeviceLike, FuseMode
from .cosine import compute_features, cosine, validity
from .dtypes import no_autocast, upcast
from .resize import grid_of, resize_labels, upsample_labels

# ------------------------------------------------------------------------------------------------ dynamic


def prototype_cosine(
    features: Tensor, prototypes: Tensor, valid: Optional[Tensor], eps: float, phi: Optional[Tensor] = None
) -> Tensor:
    """Cosine ``(B, K, h*w)`` of the features with the prototypes in the compute dtype, ``-inf`` where a prototype
    is not valid (``valid=None``: :func:`validity`); no gradient; ``phi`` reuses the features' inverse norms. The
    dynamic labels are its thresholded arg max (:func:`labels_from_cosine`)."""
    B = features.shape[0]
    K = prototypes.shape[-2]
    keep = validity(prototypes, valid).expand(B, K)[:, :, None]
    with torch.no_grad(), no_autocast(features):
        f = compute_features(features.detach(), prototypes)
        s = cosine(f, prototypes.detach().to(f.dtype), eps, phi)  # b k n
        return torch.where(keep, s, torch.full_like(s, -math.inf))


def labels_from_cosine(
    s: Tensor, grid: Tuple[int, int], threshold: float, ignore_index: int, size: Optional[Tuple[int, int]]
) -> Tensor:
    """Arg max of a cosine ``(B, K, h*w)`` where it exceeds ``threshold``, else ignore: ``(B, h, w)`` on the
    feature ``grid``, or nearest-resized to ``size`` ``(B, H, W)``, int64."""
    K = s.shape[1]
    h, w = grid
    with torch.no_grad():
        best, arg = s.max(dim=1)  # b n
        labels = torch.where(best > threshold, arg, torch.full_like(arg, ignore_index))
        labels = rearrange(labels, "b (h w) -> b h w", h=h, w=w)
        if size is not None and tuple(labels.shape[-2:]) != tuple(size):
            if size[0] * size[1] > h * w and K <= 256 and 0 <= ignore_index <= 255:
                labels = upsample_labels(labels, size, torch.uint8)  # ids fit a byte: a quarter of the traffic
            else:
                labels = resize_labels(labels, size, "nearest", K, ignore_index)
    return labels


def fuse(static: Tensor, dynamic: Tensor, mode: FuseMode, ignore_index: int) -> Tensor:
    """Hybrid labels at the static labels' size (``dynamic`` nearest-resized to it)."""
    y_f = static.long()
    y_d = resize_labels(dynamic.long(), grid_of(y_f), "nearest", None, ignore_index)
    if mode == "fill":
        return torch.where(y_f != ignore_index, y_f, y_d)
    if mode == "dynamic_first":
        return torch.where(y_d != ignore_index, y_d, y_f)
    return torch.where(y_f == y_d, y_f, torch.full_like(y_f, ignore_index))


# ------------------------------------------------------------------------------------------------ static


def confidence(logits: Tensor) -> Tuple[Tensor, Tensor]:
    r"""Max softmax probability (float64) and arg max over classes of ``(B, K, H, W)`` logits.

    :math:`c = 1 / (1 + r)` with :math:`r = \sum_{k \ne \hat y} \exp(z_k - z_{\hat y})` summed in fp32 (fp64 for
    fp64 logits) and the division in float64: the largest softmax probability, but confident pixels are not
    rounded to 1 (float32 ``softmax().max()`` is exactly 1 for logit margins above ~17, which ties the most
    confident pixels of a class together).
    """
    with no_autocast(logits):
        z = upcast(logits)
        top, pred = z.max(dim=1, keepdim=True)  # b 1 h w
        ratios = torch.exp(z - top).scatter_(1, pred, 0.0)  # exp(z_k - z_max) of the other classes
        rest = ratios.sum(dim=1).to(torch.float64)  # b h w
        return 1.0 / (1.0 + rest), pred[:, 0]


def static_labels(
    logits: Tensor, class_thresholds: Optional[Tensor], proportion: float, ignore_index: int
) -> Tensor:
    """Arg max where the confidence passes its class's threshold or the image's top ``proportion``."""
    _, _, H, W = logits.shape
    conf, pred = confidence(logits)  # b h w
    keep = torch.zeros_like(pred, dtype=torch.bool)
    if class_thresholds is not None:
        keep = keep | (conf >= class_thresholds.to(torch.float64)[pred])  # float64 on both sides
    if proportion > 0:
        n = max(1, math.floor(proportion * H * W))
        flat = rearrange(conf, "b h w -> b (h w)")
        nth_largest = flat.kthvalue(H * W - n + 1, dim=1).values  # b
        keep = keep | (conf >= nth_largest[:, None, None])
    return torch.where(keep, pred, torch.full_like(pred, ignore_index))


# Confidence bins of ClassBalancedThresholds: uniform in c on [0, 0.95) (flat, low-confidence classes), then
# uniform in s = -log(1 - c) from s(0.95) to 36 (saturated classes: c = 1 - e^{-s}; the float64 confidences of
# `confidence` resolve 1 - c down to ~1e-16, s ~ 36.7). Spacing in c is at most 6.7e-4 with 4096 bins.
_BODY_TOP = 0.95
_BODY_SHARE = 0.4
_S_MAX = 36.0


def bin_edges(bins: int, device: DeviceLike = None) -> Tensor:
    r"""Lower edges of the confidence bins of :class:`protocl.ClassBalancedThresholds`: ``Tensor[bins]`` float64.

    .. math::
        E_j = \begin{cases} 0.95\, j / n_0 & j < n_0 \\
        1 - \exp(-s_j), \quad s_j = s_0 + (j - n_0) \frac{36 - s_0}{n_1 - 1} & j \ge n_0 \end{cases}

    with :math:`n_0 = \max(1, \lfloor 0.4 \cdot \text{bins} \rfloor)`, :math:`n_1 = \text{bins} - n_0`,
    :math:`s_0 = -\log(1 - 0.95)`: uniform in :math:`c` below 0.95, uniform in :math:`s = -\log(1 - c)` above,
    so that the bins resolve confidences of saturated classes (all within :math:`10^{-5}` of 1) as finely as those
    of uncertain ones. Bin ``j`` holds :math:`E_j \le c < E_{j+1}` (the last bin is closed at 1). Near
    :math:`s = 36` float64 cannot tell the edges apart: equal edges leave empty bins, which is harmless.

    Example:
        >>> e = bin_edges(4096)
        >>> e.shape, bool(e[0] == 0), bool((e.diff() >= 0).all()), bool(e.diff().max() < 1e-3)
        (torch.Size([4096]), True, True, True)
    """
    n0 = max(1, math.floor(_BODY_SHARE * bins))
    n1 = bins - n0
    body = torch.arange(n0, dtype=torch.float64, device=device) * (_BODY_TOP / n0)
    s0 = -math.log1p(-_BODY_TOP)
    step = (_S_MAX - s0) / max(1, n1 - 1)
    tail = -torch.expm1(-(s0 + torch.arange(n1, dtype=torch.float64, device=device) * step))
    return torch.cat([body, tail])


def confidence_histogram(logits: Tensor, num_classes: int, bins: int) -> Tensor:
    """``(K, bins)`` int64 counts of the confidences of the pixels predicted as each class."""
    conf, pred = confidence(logits)
    # bin j holds E_j <= c < E_{j+1} (float64 on both sides: exactly the pixels that pass E_j)
    bin_index = torch.searchsorted(bin_edges(bins, logits.device), conf, right=True) - 1
    flat = (pred * bins + bin_index).reshape(-1)
    counts = torch.zeros(num_classes * bins, dtype=torch.int64, device=logits.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return counts.view(num_classes, bins)


def thresholds(histogram: Tensor, proportion: float) -> Tensor:
    """Per-class thresholds ``(K,)`` float64 from ``(K, bins)`` histograms (``+inf`` for empty classes): the edge
    of the bin holding the n-th most confident pixel whose pass count is closer to n in ratio."""
    bins = histogram.shape[1]
    counts = histogram.sum(dim=1)  # k
    n = torch.floor(proportion * counts.to(torch.float64)).clamp_min(1)  # k
    at_or_above = histogram.flip(1).cumsum(1).flip(1).to(torch.float64)  # k bins: pixels in bins >= j
    j = ((at_or_above >= n[:, None]).sum(1) - 1).clamp_min(0)  # the bin of the n-th most confident pixel
    passing_j = at_or_above.gather(1, j[:, None])[:, 0]  # >= n pass E_j
    passing_next = passing_j - histogram.gather(1, j[:, None])[:, 0].to(torch.float64)  # < n pass E_{j+1}
    # the edge whose passing count is closer to n in ratio: E_{j+1} when n / b < a / n, i.e. a * b > n^2
    up = (passing_next > 0) & (passing_j * passing_next > n * n)
    chosen = bin_edges(bins, histogram.device)[torch.where(up, j + 1, j).clamp_max(bins - 1)]
    return torch.where(counts > 0, chosen, torch.full_like(chosen, math.inf))
