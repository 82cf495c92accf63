"""Label resizing between the label grid (H×W) and the feature grid (h×w).

``"nearest"`` reproduces ``F.interpolate(mode="nearest")`` bit for bit. For output index ``i`` it reads input
index ``min(floor(i · s), in - 1)`` with ``s = in / out`` computed in **float32**, as PyTorch's kernels do. This is
the spec's ``floor(i · H / h)`` except for the size pairs where the float32 scale rounds down and an exact multiple
lands just below an integer (92 → 730 is one): there protocl follows ``F.interpolate``, so labels resized here
match labels resized by a trainer with ``F.interpolate``, and the authors' release is reproduced exactly.

``"purity"`` gives each feature cell the majority label of the label pixels it covers (the pixels that nearest
upsampling from the feature grid maps to that cell), or ``ignore_index`` when that majority is below
``min_purity`` of the cell's pixels (ignored pixels count in the cell's size) or the cell covers no pixel.
Ties go to the lowest class id.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ._validation import (
    IGNORE_INDEX,
    check_choice,
    check_ignore_index,
    check_int,
    check_label_tensor,
    check_label_values,
    check_range,
    check_size2,
)

__all__ = ["resize_labels", "nearest_source_index", "label_histogram"]

RESIZE_MODES = ("nearest", "purity")
MIN_PURITY = 0.75
"""Default ``min_purity`` of the ``"purity"`` label resize (the protocl method spec, §2)."""


def nearest_source_index(out_size: int, in_size: int, device=None) -> Tensor:
    r"""Input index read by each output index under ``F.interpolate(mode="nearest")``.

    .. math::
        \text{src}(i) = \min(\lfloor i \cdot \text{fl}_{32}(\text{in}/\text{out}) \rfloor, \text{in} - 1)

    with the product and the scale in float32, exactly as PyTorch's CPU and CUDA kernels compute it.

    Args:
        out_size: length of the resized axis.
        in_size: length of the original axis.
        device: device of the returned tensor.

    Returns:
        ``Tensor[out_size]`` int64 of indices into the original axis.

    Shape:
        - output: :math:`(\text{out\_size},)`

    Example:
        >>> nearest_source_index(4, 8)
        tensor([0, 2, 4, 6])
        >>> nearest_source_index(5, 2)
        tensor([0, 0, 0, 1, 1])
    """
    out_size = check_int(out_size, "out_size", 1)
    in_size = check_int(in_size, "in_size", 1)
    if out_size == in_size:
        return torch.arange(out_size, device=device)
    if out_size == 2 * in_size:
        return torch.arange(out_size, device=device) // 2
    # the scale is rounded to float32 on the host (no host-to-device copy, so nothing syncs or breaks CUDA-graph
    # capture); a float32 tensor times a Python scalar multiplies in float32, as the kernels do
    scale = float(np.float32(in_size) / np.float32(out_size))
    src = (torch.arange(out_size, device=device, dtype=torch.float32) * scale).floor().to(torch.int64)
    return src.clamp_max(in_size - 1)


def _cell_index(label_size: Tuple[int, int], grid_size: Tuple[int, int], device) -> Tensor:
    """For every label pixel, the flat index of the feature cell that nearest upsampling reads: ``(H, W)``."""
    (H, W), (h, w) = label_size, grid_size
    rows = nearest_source_index(H, h, device)  # label row -> feature row
    cols = nearest_source_index(W, w, device)
    return rows[:, None] * w + cols[None, :]


def nearest_gather(x: Tensor, size: Tuple[int, int]) -> Tensor:
    """Nearest resize of any ``(B, H, W)`` tensor to ``(B, h, w)`` (``F.interpolate`` rule) by one gather that
    reads only the ``h·w`` selected elements per image (the fast way down; any dtype)."""
    B, H, W = x.shape
    h, w = size
    rows = nearest_source_index(h, H, x.device)
    cols = nearest_source_index(w, W, x.device)
    index = (rows[:, None] * W + cols[None, :]).reshape(-1)
    return x.reshape(B, H * W).index_select(1, index).view(B, h, w)


def known_labels(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Pixels that carry a class: ids in ``[0, K)`` other than ``ignore_index``. Ids outside ``[0, K)`` (possible
    only with value checks off) count as ignored, so a bad id never indexes out of bounds on the device."""
    known = (labels >= 0) & (labels < num_classes)
    if 0 <= ignore_index < num_classes:  # an ignore_index outside [0, K) is excluded by the range already
        known = known & (labels != ignore_index)
    return known


def _upsample_labels(labels: Tensor, size: Tuple[int, int], dtype: torch.dtype) -> Tensor:
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
    *,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Per-cell class histogram: how many label pixels of each class each feature cell covers.

    Label pixel :math:`(I, J)` belongs to the cell :math:`(\text{src}_h(I), \text{src}_w(J))` that nearest
    upsampling of an ``(h, w)`` map to ``(H, W)`` would read (see :func:`nearest_source_index`); so a sum over
    cells weighted by this histogram equals a sum over label pixels of nearest-upsampled values, without
    materialising anything at ``(H, W)`` per class. Ignored pixels are not counted.

    Args:
        labels: ``Tensor[B, H, W]`` int64 class ids (``ignore_index`` allowed).
        size: the feature grid ``(h, w)``.
        num_classes: K.
        ignore_index: label id that is not counted.

    Returns:
        ``Tensor[B, K, h, w]`` float32 counts.

    Shape:
        - labels: :math:`(B, H, W)`; output: :math:`(B, K, h, w)`

    Example:
        >>> y = torch.tensor([[[0, 0, 1, 255]]])
        >>> label_histogram(y, (1, 2), 2)[0, :, 0]
        tensor([[2., 0.],
                [0., 1.]])
    """
    check_label_tensor(labels, "labels", (3,), "(B, H, W)")
    num_classes = check_int(num_classes, "num_classes", 1)
    h, w = check_size2(size, "size")
    ignore_index = check_ignore_index(ignore_index)
    check_label_values(labels, num_classes, ignore_index, "labels")
    return _label_histogram(labels.long(), (h, w), num_classes, ignore_index)


def _label_histogram(labels: Tensor, size: Tuple[int, int], num_classes: int, ignore_index: int) -> Tensor:
    B, H, W = labels.shape
    h, w = size
    K = num_classes
    # int32 index arithmetic: half the memory traffic of int64 over the (B, H, W) label map
    cell = _cell_index((H, W), (h, w), labels.device).to(torch.int32)  # (H, W)
    known = known_labels(labels, K, ignore_index)
    # ignore (and, with value checks off, bad ids) -> extra bin K; flat target index over (b, K+1, h, w)
    flat = torch.where(known, labels.to(torch.int32), K)  # b H W, the class bin
    base = (torch.arange(B, device=labels.device, dtype=torch.int32) * (K + 1))[:, None, None]
    flat = flat.add_(base).mul_(h * w).add_(cell).reshape(-1)  # in place: no further label-sized temporaries
    hist = torch.zeros(B * (K + 1) * h * w, dtype=torch.float32, device=labels.device)
    hist.index_add_(0, flat, torch.ones((), dtype=torch.float32, device=labels.device).expand(flat.numel()))
    hist = rearrange(hist, "(b k h w) -> b k h w", b=B, k=K + 1, h=h, w=w)
    return hist[:, :K]


def resize_labels(
    labels: Tensor,
    size: Tuple[int, int],
    *,
    mode: str = "nearest",
    num_classes: int | None = None,
    ignore_index: int = IGNORE_INDEX,
    min_purity: float = MIN_PURITY,
) -> Tensor:
    r"""Resize a label map to ``size`` by nearest neighbour (``F.interpolate`` rule) or by cell purity.

    Args:
        labels: ``Tensor[B, H, W]`` integer class ids.
        size: target ``(h, w)``.
        mode: ``"nearest"`` or ``"purity"`` (see the module docstring).
        num_classes: K; required by ``"purity"``.
        ignore_index: label id of ignored pixels.
        min_purity: for ``"purity"``, the share of a cell's pixels the majority class needs, in ``[0, 1]``.

    Returns:
        ``Tensor[B, h, w]`` int64.

    Shape:
        - labels: :math:`(B, H, W)`
        - output: :math:`(B, h, w)`

    Example:
        >>> y = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 255]]])
        >>> resize_labels(y, (1, 2))
        tensor([[[0, 1]]])
        >>> resize_labels(y, (1, 2), mode="purity", num_classes=2, min_purity=0.9)
        tensor([[[  0, 255]]])
    """
    check_label_tensor(labels, "labels", (3,), "(B, H, W)")
    size = check_size2(size, "size")
    check_choice(mode, "mode", RESIZE_MODES)
    ignore_index = check_ignore_index(ignore_index)
    check_range(min_purity, "min_purity", 0.0, 1.0)
    if mode == "purity":
        if num_classes is None:
            raise ValueError("num_classes: expected an int >= 1 for mode='purity', got None")
        check_int(num_classes, "num_classes", 1)
        check_label_values(labels, num_classes, ignore_index, "labels")
    return _resize_labels(labels.long(), size, mode, num_classes, ignore_index, min_purity)


def _resize_labels(
    labels: Tensor,
    size: Tuple[int, int],
    mode: str,
    num_classes=None,
    ignore_index: int = IGNORE_INDEX,
    min_purity: float = MIN_PURITY,
) -> Tensor:
    B, H, W = labels.shape
    h, w = size
    if mode == "nearest":
        if (H, W) == (h, w):
            return labels
        if h * w > H * W:
            return _upsample_labels(labels, (h, w), torch.float32)
        return nearest_gather(labels, (h, w))
    hist = _label_histogram(labels, (h, w), num_classes, ignore_index)  # (B, K, h, w)
    # pixels per cell, ignored ones included: separable product of row and column coverage
    rows = _coverage(nearest_source_index(H, h, labels.device), h)
    cols = _coverage(nearest_source_index(W, w, labels.device), w)
    cell_size = rows[:, None] * cols[None, :]  # (h, w)
    top, arg = hist.max(dim=1)  # (B, h, w)
    pure = (top > 0) & (top >= min_purity * cell_size)
    return torch.where(pure, arg, torch.full_like(arg, ignore_index))
