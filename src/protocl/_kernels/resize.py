"""Label resizing between the label grid (H×W) and the feature grid (h×w); see :mod:`protocl.resize`."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .._types import IGNORE_INDEX, MIN_PURITY, DeviceLike, ResizeMode


def grid_of(x: Tensor) -> Tuple[int, int]:
    """The last two sizes of ``x`` (its spatial grid ``(h, w)``), as a pair (symbolic under dynamic shapes)."""
    return x.shape[-2], x.shape[-1]


def source_index(out_size: int, in_size: int, device: DeviceLike = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Input index read by each output index under ``F.interpolate(mode="nearest")``: ``Tensor[out_size]`` int64.

    ``dtype=float32`` (the rule of every dtype but float64, and of float64 on CUDA):
    ``min(floor(i * fl32(in / out)), in - 1)`` with the scale rounded to float32 on the host (no host-to-device
    copy, so nothing syncs or breaks CUDA-graph capture) and the product in float32. ``dtype=float64`` (the rule
    of PyTorch's generic CPU kernel for float64 input): the scale and the product in float64, the product
    rounded to float32 before the floor (``floorf``). Sizes equal or doubled are exact either way.
    """
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    if out_size == 2 * in_size:
        return torch.arange(out_size, device=device) // 2
    if dtype == torch.float64:
        scale = in_size / out_size  # float64 on the host
        src = (torch.arange(out_size, device=device, dtype=torch.float64) * scale).to(torch.float32)
    else:
        scale = float(np.float32(in_size) / np.float32(out_size))
        src = torch.arange(out_size, device=device, dtype=torch.float32) * scale
    return src.floor().to(torch.int64).clamp_max(in_size - 1)


def upsample_rule(out_size: Tuple[int, int], device: DeviceLike, dtype: torch.dtype) -> torch.dtype:
    """The index rule ``F.interpolate(x, out_size, mode="nearest")`` uses for a contiguous ``(B, K, h, w)`` map
    of ``dtype`` on ``device``: float64 only for float64 on CPU when ``H + W > 128`` (PyTorch's generic kernel;
    smaller outputs go to its vectorised kernel, and CUDA always computes in float32), else float32."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype == torch.float64 and device.type == "cpu" and out_size[0] + out_size[1] > 128:
        return torch.float64
    return torch.float32


def cell_index(
    label_size: Tuple[int, int], grid_size: Tuple[int, int], device: DeviceLike, dtype: torch.dtype = torch.float32
) -> Tensor:
    """For every label pixel, the flat index of the feature cell that nearest upsampling reads: ``(H, W)``.

    ``dtype`` is the index rule (:func:`source_index`): float32 for labels (resized as ``F.interpolate`` resizes
    ``labels.float()``), :func:`upsample_rule` for maps of feature values upsampled to the label grid."""
    (H, W), (h, w) = label_size, grid_size
    rows = source_index(H, h, device, dtype)  # label row -> feature row
    cols = source_index(W, w, device, dtype)
    return rows[:, None] * w + cols[None, :]


def nearest_gather(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest resize of any ``(B, H, W)`` tensor to ``(B, h, w)`` (``F.interpolate`` rule) by one gather that
    reads only the ``h·w`` selected elements per image (the fast way down; any dtype)."""
    B, H, W = x.shape
    h, w = size
    rows = source_index(h, H, x.device)
    cols = source_index(w, W, x.device)
    index = (rows[:, None] * W + cols[None, :]).reshape(-1)
    return x.reshape(B, H * W).index_select(1, index).view(B, h, w)


def known_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Pixels that carry a class: ids in ``[0, K)`` other than ``ignore_index``. Ids outside ``[0, K)`` (possible
    only with value checks off) count as ignored, so a bad id never indexes out of bounds on the device."""
    known = (labels >= 0) & (labels < num_classes)
    if 0 <= ignore_index < num_classes:  # an ignore_index outside [0, K) is excluded by the range already
        known = known & (labels != ignore_index)
    return known


def upsample_labels(labels: Tensor, size: Tuple[int, int], dtype: torch.dtype) -> Tensor:
    """Nearest upsampling by ``F.interpolate`` itself, through ``dtype``: float32 is exact for ids below 2**24 in
    magnitude (a larger, invalid id stays invalid); uint8 serves labels known to lie in [0, 255]."""
    up = F.interpolate(labels[:, None].to(dtype), size=size, mode="nearest")
    return up[:, 0].to(torch.int64)


def _coverage(src: Tensor, n: int) -> Tensor:
    """How many label rows (or columns) each of ``n`` feature rows covers: ``Tensor[n]`` float32."""
    ones = torch.ones(src.numel(), dtype=torch.float32, device=src.device)
    return torch.zeros(n, dtype=torch.float32, device=src.device).index_add_(0, src, ones)


def label_histogram(
    labels: Tensor,
    size: Tuple[int, int],
    num_classes: int,
    ignore_index: int,
    *,
    rule: torch.dtype = torch.float32,
    values: Optional[Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Per-cell class histogram ``(B, K, h, w)`` of int64 labels ``(B, H, W)`` (see
    :func:`protocl.label_histogram`): ``dtype`` counts, or sums of per-pixel ``values`` ``(B, H, W)``; ``rule``
    is the index rule of the cells (:func:`cell_index`)."""
    B, H, W = labels.shape
    h, w = size
    K = num_classes
    # int32 index arithmetic: half the memory traffic of int64 over the (B, H, W) label map
    cell = cell_index((H, W), (h, w), labels.device, rule).to(torch.int32)  # (H, W)
    known = known_labels(labels, K, ignore_index)
    # ignore (and, with value checks off, bad ids) -> extra bin K; flat target index over (b, K+1, h, w)
    flat = torch.where(known, labels.to(torch.int32), K)  # b H W, the class bin
    base = (torch.arange(B, device=labels.device, dtype=torch.int32) * (K + 1))[:, None, None]
    flat = flat.add_(base).mul_(h * w).add_(cell).reshape(-1)  # in place: no further label-sized temporaries
    hist = torch.zeros(B * (K + 1) * h * w, dtype=dtype, device=labels.device)
    if values is None:
        source = torch.ones((), dtype=dtype, device=labels.device).expand(flat.numel())
    else:
        source = values.detach().to(dtype).reshape(-1)
    hist.index_add_(0, flat, source)
    hist = rearrange(hist, "(b k h w) -> b k h w", b=B, k=K + 1, h=h, w=w)
    return hist[:, :K]


def resize_labels(
    labels: Tensor,
    size: Tuple[int, int],
    mode: ResizeMode = "nearest",
    num_classes: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    min_purity: float = MIN_PURITY,
) -> Tensor:
    """Labels ``(B, H, W)`` int64 resized to ``(B, h, w)`` by nearest neighbour or cell purity (``num_classes``
    is required by ``"purity"``; see :func:`protocl.resize_labels`)."""
    B, H, W = labels.shape
    h, w = size
    if mode == "nearest":
        if (H, W) == (h, w):
            return labels
        if h * w > H * W:
            return upsample_labels(labels, (h, w), torch.float32)
        return nearest_gather(labels, (h, w))
    if num_classes is None:  # the public functions check it; a kernel caller that forgets gets this
        raise ValueError("num_classes: expected an int >= 1 for mode='purity', got None")
    hist = label_histogram(labels, (h, w), num_classes, ignore_index)  # (B, K, h, w)
    # pixels per cell, ignored ones included: separable product of row and column coverage
    rows = _coverage(source_index(H, h, labels.device), h)
    cols = _coverage(source_index(W, w, labels.device), w)
    cell_size = rows[:, None] * cols[None, :]  # (h, w)
    top, arg = hist.max(dim=1)  # (B, h, w)
    pure = (top > 0) & (top >= min_purity * cell_size)
    return torch.where(pure, arg, torch.full_like(arg, ignore_index))
