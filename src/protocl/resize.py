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

from typing import Optional, Tuple

import torch  # noqa: F401  (the doctests use it)
from torch import Tensor

from ._kernels import resize as kernels
from ._validation import (
    IGNORE_INDEX,
    MIN_PURITY,
    RESIZE_MODES,
    ResizeMode,
    check_choice,
    check_ignore_index,
    check_int,
    check_label_tensor,
    check_label_values,
    check_range,
    check_size2,
)

__all__ = ["resize_labels", "nearest_source_index", "label_histogram"]


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
    return kernels.source_index(out_size, in_size, device)


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
    return kernels.resize_labels(labels.long(), size, mode, num_classes, ignore_index, min_purity)
