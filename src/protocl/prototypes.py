"""Class prototypes: masked average pooling of pixel features, and their exponential moving average.

Spec (the protocl method spec, §3): ``masked_average_pool`` and ``PrototypeEMA``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ._kernels import prototypes as kernels
from ._types import IGNORE_INDEX, MIN_PURITY, MOMENTUM, RESIZE_MODES, ResizeMode
from ._validation import (
    check_bool,
    check_channels,
    check_choice,
    check_dim_size,
    check_features_labels,
    check_float_tensor,
    check_ignore_index,
    check_int,
    check_label_values,
    check_pixel_weights,
    check_range,
    check_same_device,
    check_tensor,
    report_pending,
    shape_equals,
)
from .distributed import all_reduce_sum_, is_distributed

__all__ = ["PooledPrototypes", "masked_average_pool", "PrototypeEMA"]


class PooledPrototypes(NamedTuple):
    """Output of :func:`masked_average_pool`: ``prototypes`` (B, K, D) or (K, D) and ``counts`` (B, K) or (K,).

    ``counts > 0`` is the validity mask of the prototypes.
    """

    prototypes: Tensor
    counts: Tensor


def unpack_prototypes(prototypes: Any, valid: Any, pname: str) -> Tuple[Tensor, Any]:
    """The prototypes argument of an op: a :class:`PooledPrototypes` gives its prototypes and ``counts > 0`` (then
    ``valid`` must be None); a tensor is returned as is, with ``valid`` (validated by the caller)."""
    if isinstance(prototypes, PooledPrototypes):
        if valid is not None:
            raise ValueError(
                f"valid: expected None when {pname} is a PooledPrototypes (its counts > 0 are the validity), "
                f"got a tensor; pass {pname}.prototypes to give valid yourself"
            )
        return prototypes.prototypes, prototypes.counts > 0
    return check_tensor(prototypes, pname), valid


def masked_average_pool(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    ignore_index: int = IGNORE_INDEX,
    per_image: bool = True,
    weights: Optional[Tensor] = None,
    resize: ResizeMode = "nearest",
    min_purity: float = MIN_PURITY,
) -> PooledPrototypes:
    r"""Class prototypes as the masked average of pixel features (masked average pooling, MAP).

    Labels are resized to the feature grid (nearest, the ``F.interpolate`` rule; or ``"purity"``). With
    :math:`y(b, p)` the resized label and :math:`w(b, p) \ge 0` an optional pixel weight (default 1):

    .. math::
        n_{b,k} = \sum_p [y(b,p)=k]\, w(b,p), \qquad
        \mathbf{p}_{b,k} = \frac{\sum_p [y(b,p)=k]\, w(b,p)\, \mathbf{f}(b,:,p)}{n_{b,k}}
        \quad (\mathbf{0} \text{ when } n_{b,k} = 0)

    ``per_image=False`` sums over the batch too (one prototype per class). Gradients flow into ``features``
    only. Cost: one batched matrix product; no ``(B, K, D, h, w)`` temporary.

    Args:
        features: ``Tensor[B, D, h, w]`` pixel features (fp16/bf16 are pooled in fp32; fp64 stays fp64).
        labels: ``Tensor[B, H, W]`` (or mmseg's ``gt_semantic_seg`` ``Tensor[B, 1, H, W]``) int64 class ids in
            ``[0, K)`` or ``ignore_index``.
        num_classes: K.
        ignore_index: label id of pixels that belong to no class.
        per_image: one prototype per (image, class) if True, per class over the batch if False.
        weights: optional non-negative pixel weights ``Tensor[B, h, w]`` (feature grid) or ``Tensor[B, H, W]``
            (label grid, nearest-resized with the labels). Not differentiated.
        resize: ``"nearest"`` or ``"purity"`` (see :func:`protocl.resize_labels`).
        min_purity: purity threshold for ``resize="purity"``.

    Returns:
        ``PooledPrototypes(prototypes, counts)``: ``(B, K, D)`` and ``(B, K)`` (or ``(K, D)`` and ``(K,)``), in
        fp32 (fp64 for fp64 features). ``counts > 0`` marks valid prototypes.

    Shape:
        - features: :math:`(B, D, h, w)`
        - labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)`
        - prototypes: :math:`(B, K, D)`, or :math:`(K, D)` with ``per_image=False``
        - counts: :math:`(B, K)`, or :math:`(K,)`

    Example:
        >>> f = torch.randn(2, 8, 5, 5, requires_grad=True)
        >>> y = torch.randint(0, 3, (2, 17, 17))
        >>> protos, counts = masked_average_pool(f, y, num_classes=3)
        >>> protos.shape, counts.shape
        (torch.Size([2, 3, 8]), torch.Size([2, 3]))
        >>> protos.sum().backward()
    """
    report_pending()
    labels = check_features_labels(features, labels)
    num_classes = check_int(num_classes, "num_classes", 1)
    ignore_index = check_ignore_index(ignore_index)
    check_bool(per_image, "per_image")
    check_choice(resize, "resize", RESIZE_MODES)
    check_range(min_purity, "min_purity", 0.0, 1.0)
    if weights is not None:
        weights = check_pixel_weights(weights, features, labels, "weights", "masked_average_pool")
    check_label_values(labels, num_classes, ignore_index, "labels", "masked_average_pool")
    sums, counts = kernels.class_sums(
        features, labels, num_classes, ignore_index=ignore_index, weights=weights, resize=resize,
        min_purity=min_purity,
    )
    if not per_image:
        sums, counts = sums.sum(0), counts.sum(0)
    return PooledPrototypes(kernels.divide_counts(sums, counts), counts)


class PrototypeEMA(nn.Module):
    r"""Exponential moving average of class prototypes, synchronised across ranks.

    State (registered buffers, so ``.to()``, ``state_dict()`` and DDP handle it): ``prototypes`` ``(K, D)``
    fp32 and ``initialized`` ``(K,)`` bool. Each ``update`` pools the batch prototype :math:`m_k` over the whole
    batch (and over all ranks when ``torch.distributed`` is initialised and ``sync=True``: per-class sums and
    counts are all-reduced before dividing), then, for every class with a count > 0:

    .. math::
        \mu_k \leftarrow \begin{cases} m_k & \text{first time class } k \text{ is seen} \\
        \lambda \mu_k + (1 - \lambda)\, m_k & \text{otherwise} \end{cases}

    with :math:`\lambda` = ``momentum`` (a fixed rate: never count-weighted). Classes with count 0 are untouched.
    State changes only inside the ``@torch.no_grad()`` update methods; ``forward()`` returns the prototypes.

    Args:
        num_classes: K.
        dim: D, the feature channels.
        momentum: :math:`\lambda \in [0, 1)`; the paper's grid is {0.99, 0.999, 0.9999}.
        sync: all-reduce sums and counts across ranks when distributed.

    Shape:
        - prototypes: :math:`(K, D)`; initialized: :math:`(K,)`

    Example:
        >>> ema = PrototypeEMA(num_classes=3, dim=8, momentum=0.9)
        >>> ema.update(torch.randn(2, 8, 5, 5), torch.randint(0, 3, (2, 10, 10)))
        >>> ema.prototypes.shape, ema.initialized.tolist()
        (torch.Size([3, 8]), [True, True, True])
    """

    prototypes: Tensor
    initialized: Tensor

    def __init__(self, num_classes: int, dim: int, momentum: float = MOMENTUM, *, sync: bool = True) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.dim = check_int(dim, "dim", 1)
        self.momentum = check_range(momentum, "momentum", 0.0, 1.0, high_inclusive=False)
        self.sync = check_bool(sync, "sync")
        self.register_buffer("prototypes", torch.zeros(self.num_classes, self.dim, dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros(self.num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, dim={self.dim}, momentum={self.momentum}, sync={self.sync}"

    def forward(self) -> Tensor:
        """Return the current prototypes ``(K, D)`` (a pure read)."""
        report_pending()
        return self.prototypes

    @torch.no_grad()
    def update(
        self,
        features: Tensor,
        labels: Tensor,
        *,
        ignore_index: int = IGNORE_INDEX,
        resize: ResizeMode = "nearest",
        min_purity: float = MIN_PURITY,
        weights: Optional[Tensor] = None,
    ) -> None:
        """Update from pixel features ``(B, D, h, w)`` and labels ``(B, H, W)`` or ``(B, 1, H, W)`` (pooled over
        the batch); ``resize``,
        ``min_purity`` and ``weights`` as in :func:`masked_average_pool`."""
        report_pending()
        labels = check_features_labels(features, labels)
        check_channels(features, self.dim, "features", "the dim of the EMA")
        ignore_index = check_ignore_index(ignore_index)
        check_choice(resize, "resize", RESIZE_MODES)
        check_range(min_purity, "min_purity", 0.0, 1.0)
        if weights is not None:
            weights = check_pixel_weights(weights, features, labels, "weights", "PrototypeEMA.update")
        check_label_values(labels, self.num_classes, ignore_index, "labels", "PrototypeEMA.update")
        sums, counts = kernels.class_sums(
            features.detach(), labels, self.num_classes, ignore_index=ignore_index, weights=weights, resize=resize,
            min_purity=min_purity,
        )
        self._update_sums(sums.sum(0), counts.sum(0))

    @torch.no_grad()
    def update_from(self, prototypes: Tensor, counts: Tensor) -> None:
        """Update from :func:`masked_average_pool` output: ``(B, K, D)`` + ``(B, K)`` or ``(K, D)`` + ``(K,)``.

        Per-image rows are pooled by their counts (the same batch prototype as :meth:`update`).
        """
        report_pending()
        check_float_tensor(prototypes, "prototypes", (2, 3), "(B, K, D) or (K, D)")
        check_tensor(counts, "counts")
        if counts.dtype == torch.bool or counts.is_complex():
            raise TypeError(
                f"counts: expected a real (float or int) tensor of shape (B, K) or (K,), got {counts.dtype}"
            )
        check_same_device("prototypes", prototypes, "counts", counts)
        check_dim_size(prototypes, -2, self.num_classes, "prototypes", "K, the classes of the EMA")
        check_dim_size(prototypes, -1, self.dim, "prototypes", "D, the channels of the EMA")
        if not shape_equals(counts.shape, prototypes.shape[:-1]):
            raise ValueError(
                f"counts: expected shape {tuple(prototypes.shape[:-1])} to match prototypes "
                f"{tuple(prototypes.shape)}, got {tuple(counts.shape)}"
            )
        self._update_sums(*kernels.batch_sums(prototypes, counts))

    def _update_sums(self, sums: Tensor, counts: Tensor) -> None:
        check_same_device("prototypes (EMA buffer)", self.prototypes, "features", sums)
        if self.sync and is_distributed():
            # always float64 on the wire: ranks feeding different dtypes still match, and sums stay exact longer
            packed = torch.cat([sums, counts[:, None]], dim=1).to(torch.float64).contiguous()
            packed = all_reduce_sum_(packed)
            sums, counts = packed[:, :-1], packed[:, -1]
        prototypes, initialized = kernels.ema_blend(self.prototypes, self.initialized, sums, counts, self.momentum)
        self.prototypes.copy_(prototypes)
        self.initialized.copy_(initialized)
