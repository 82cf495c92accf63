"""Label resizing between the label grid (H×W) and the feature grid (h×w).

``"nearest"`` reproduces ``F.interpolate(mode="nearest")`` bit for bit, in the dtype that a trainer resizes with:

- **labels** (``resize_labels``, pooling, ``at="feature"``, ``label_histogram``) follow the rows
  ``F.interpolate`` picks for ``labels.float()`` (the release's and mmseg's call): output index ``i`` reads input
  index ``min(floor(i · s), in - 1)`` with ``s = in / out`` and the product in **float32**. This is also the rule
  of float16/bfloat16/uint8 input, and of every dtype on CUDA. It is the spec's ``floor(i · H / h)`` except for
  the size pairs where the float32 scale rounds down and an exact multiple lands just below an integer
  (92 → 730, row 365, is one);
- **feature-grid values upsampled to the label grid** (the logits of ``at="label"``) follow ``F.interpolate`` on
  a contiguous ``(B, K, h, w)`` map of the features' dtype on their device: the float32 rule above, except
  **float64 on CPU** with ``H + W > 128``, where PyTorch's generic CPU kernel computes the scale and the product
  in float64 and rounds the product to float32 before the floor (row 365 of 92 → 730 is then 46, not 45).
  ``nearest_source_index(..., dtype=torch.float64)`` returns those rows. (``torch.compile``'s decomposition
  of ``F.interpolate`` uses the float32 rule in every dtype; protocl follows eager mode.)

``"purity"`` gives each feature cell the majority label of the label pixels it covers (the pixels that nearest
upsampling from the feature grid maps to that cell), or ``ignore_index`` when that majority is below
``min_purity`` of the cell's pixels (ignored pixels count in the cell's size) or the cell covers no pixel.
Ties go to the lowest class id.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._kernels import resize as kernels
from ._types import IGNORE_INDEX, MIN_PURITY, RESIZE_MODES, DeviceLike, ResizeMode
from ._validation import (
    check_choice,
    check_ignore_index,
    check_int,
    check_label_values,
    check_range,
    check_size2,
    label_map,
    report_pending,
)

__all__ = ["resize_labels", "nearest_source_index", "label_histogram"]


def nearest_source_index(out_size: int, in_size: int, device: DeviceLike = None, *, dtype: torch.dtype = torch.float32) -> Tensor:
    r"""Input index read by each output index under ``F.interpolate(mode="nearest")``.

    .. math::
        \text{src}(i) = \min(\lfloor i \cdot \text{fl}_{32}(\text{in}/\text{out}) \rfloor, \text{in} - 1)

    with the product and the scale in float32, exactly as PyTorch's kernels compute it for float32, float16,
    bfloat16 and uint8 input (and for every dtype on CUDA); the rule of protocl's label resizing. With
    ``dtype=torch.float64``: the rule of PyTorch's generic CPU kernel for float64 input,
    :math:`\lfloor \text{fl}_{32}(i \cdot \text{in}/\text{out}) \rfloor` (scale and product in float64, rounded
    to float32 before the floor), which ``F.interpolate`` runs for an ``(N, C, H, W)`` float64 CPU input when
    ``H + W > 128`` of the output (below that, and for channels-last input with C > 3, it runs the float32 rule).
    Sizes equal or doubled read ``i`` and ``i // 2`` under both rules.

    Args:
        out_size: length of the resized axis.
        in_size: length of the original axis.
        device: device of the returned tensor.
        dtype: ``torch.float32`` (default) or ``torch.float64``, the rule above.

    Returns:
        ``Tensor[out_size]`` int64 of indices into the original axis.

    Shape:
        - output: :math:`(\text{out\_size},)`

    Example:
        >>> nearest_source_index(4, 8)
        tensor([0, 2, 4, 6])
        >>> nearest_source_index(5, 2)
        tensor([0, 0, 0, 1, 1])
        >>> nearest_source_index(730, 92)[365].item(), nearest_source_index(730, 92, dtype=torch.float64)[365].item()
        (45, 46)
    """
    report_pending()
    out_size = check_int(out_size, "out_size", 1)
    in_size = check_int(in_size, "in_size", 1)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
    return kernels.source_index(out_size, in_size, device, dtype)


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
        labels: ``Tensor[B, H, W]`` (or ``Tensor[B, 1, H, W]``) int64 class ids (``ignore_index`` allowed).
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
    report_pending()
    labels = label_map(labels, "labels")
    num_classes = check_int(num_classes, "num_classes", 1)
    h, w = check_size2(size, "size")
    ignore_index = check_ignore_index(ignore_index)
    check_label_values(labels, num_classes, ignore_index, "labels", "label_histogram")
    return kernels.label_histogram(labels.long(), (h, w), num_classes, ignore_index)


def resize_labels(
    labels: Tensor,
    size: Tuple[int, int],
    *,
    mode: ResizeMode = "nearest",
    num_classes: Optional[int] = None,
    ignore_index: int = IGNORE_INDEX,
    min_purity: float = MIN_PURITY,
) -> Tensor:
    r"""Resize a label map to ``size`` by nearest neighbour (``F.interpolate`` rule) or by cell purity.

    Args:
        labels: ``Tensor[B, H, W]`` (or ``Tensor[B, 1, H, W]``) integer class ids.
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
    report_pending()
    labels = label_map(labels, "labels")
    size = check_size2(size, "size")
    check_choice(mode, "mode", RESIZE_MODES)
    ignore_index = check_ignore_index(ignore_index)
    check_range(min_purity, "min_purity", 0.0, 1.0)
    if mode == "purity":
        if num_classes is None:
            raise ValueError("num_classes: expected an int >= 1 for mode='purity', got None")
        check_int(num_classes, "num_classes", 1)
        check_label_values(labels, num_classes, ignore_index, "labels", "resize_labels")
    return kernels.resize_labels(labels.long(), size, mode, num_classes, ignore_index, min_purity)
