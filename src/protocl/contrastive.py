"""Pixel-prototype contrastive loss, and its two directions FCL (target pixels vs source prototypes) and BCL
(source pixels vs target prototypes). The protocl method spec, §3 and §6.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from ._kernels import contrastive as kernels
from ._kernels.contrastive import ContrastSettings
from ._kernels.cosine import compute_features, cosine
from ._kernels.dtypes import no_autocast
from ._kernels.reduction import reduce_loss
from ._types import (
    ABSENT_MODES,
    AT_MODES,
    EPS,
    IGNORE_INDEX,
    MIN_PURITY,
    RESIZE_MODES,
    TEMPERATURE,
    Absent,
    At,
    Reduction,
    ResizeMode,
)
from ._validation import (
    check_choice,
    check_contrast_inputs,
    check_features_prototypes,
    check_ignore_index,
    check_int,
    check_label_values,
    check_positive,
    check_range,
    check_reduction,
    check_same_device,
    check_size2,
    label_map,
    report_pending,
)
from .prototypes import PooledPrototypes, unpack_prototypes

Prototypes = Union[Tensor, PooledPrototypes]

__all__ = [
    "pixel_prototype_contrastive_loss",
    "fcl_loss",
    "bcl_loss",
    "overlap_class_weight",
    "cosine_similarity_map",
    "PixelPrototypeContrastiveLoss",
]


def contrast_settings(
    *,
    temperature: float = TEMPERATURE,
    absent: Absent = "mask",
    at: At = "feature",
    ignore_index: int = IGNORE_INDEX,
    resize: ResizeMode = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> ContrastSettings:
    """Validated :class:`ContrastSettings` (raises ``ValueError``/``TypeError`` naming the bad setting)."""
    return ContrastSettings(
        temperature=check_positive(temperature, "temperature"),
        absent=check_choice(absent, "absent", ABSENT_MODES),
        at=check_choice(at, "at", AT_MODES),
        ignore_index=check_ignore_index(ignore_index),
        resize=check_choice(resize, "resize", RESIZE_MODES),
        min_purity=check_range(min_purity, "min_purity", 0.0, 1.0),
        eps=check_positive(eps, "eps"),
    )


def _contrastive_loss(
    fn: str, names: Tuple[str, str, str], features: Any, prototypes: Any, labels: Any, *, valid: Any,
    class_weight: Any, pixel_weight: Any, reduction: Any, **settings: Any
) -> Tensor:
    """Validate one contrastive term (its arguments called ``names`` in the public function ``fn``), then
    :func:`~protocl._kernels.contrastive.contrastive_terms` reduced."""
    report_pending()
    s = contrast_settings(**settings)
    check_reduction(reduction)
    prototypes, valid = unpack_prototypes(prototypes, valid, names[1])
    K, labels, class_weight, pixel_weight = check_contrast_inputs(
        features, prototypes, labels, valid, class_weight, pixel_weight, names, fn
    )
    check_label_values(labels, K, s.ignore_index, names[2], fn)
    loss, weight = kernels.contrastive_terms(
        features, prototypes, labels, valid, class_weight, s, per_pixel=reduction == "none", pixel_weight=pixel_weight
    )
    return reduce_loss(loss, reduction, weight)


def cosine_similarity_map(features: Tensor, prototypes: Prototypes, eps: float = EPS) -> Tensor:
    r"""Cosine similarity of every pixel feature with every prototype.

    .. math::
        s[b, k, p] = \frac{\mathbf{f}(b, :, p)^\top \mathbf{P}_{b,k}}
                          {\max(\lVert \mathbf{f}(b, :, p) \rVert, \epsilon)\, \max(\lVert \mathbf{P}_{b,k} \rVert, \epsilon)}

    Computed in fp32 (fp64 for fp64 inputs) with autocast off, as one batched matrix product scaled by the inverse
    norms; its backward writes the features' gradient with one more and never normalises or copies the features.

    Args:
        features: ``Tensor[B, D, h, w]``.
        prototypes: ``Tensor[B, K, D]`` (paired with image b) or ``Tensor[K, D]`` (shared), or a
            :class:`~protocl.PooledPrototypes` (its prototypes; absent classes are all-zero rows, cosine 0).
        eps: :math:`\epsilon`, floor of the norms (representable in fp16/bf16).

    Returns:
        ``Tensor[B, K, h, w]`` cosine similarities.

    Shape:
        - features: :math:`(B, D, h, w)`; prototypes: :math:`(B, K, D)` or :math:`(K, D)`
        - output: :math:`(B, K, h, w)`

    Example:
        >>> s = cosine_similarity_map(torch.randn(2, 8, 4, 4), torch.randn(3, 8))
        >>> s.shape
        torch.Size([2, 3, 4, 4])
    """
    report_pending()
    prototypes, _ = unpack_prototypes(prototypes, None, "prototypes")
    check_features_prototypes(features, prototypes, None, "features", "prototypes")
    eps = check_positive(eps, "eps")
    h, w = features.shape[-2:]
    with no_autocast(features):
        f = compute_features(features, prototypes)
        return rearrange(cosine(f, prototypes.to(f.dtype), eps), "b k (h w) -> b k h w", h=h, w=w)


def pixel_prototype_contrastive_loss(
    features: Tensor,
    prototypes: Prototypes,
    labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = TEMPERATURE,
    class_weight: Optional[Tensor] = None,
    pixel_weight: Optional[Tensor] = None,
    absent: Absent = "mask",
    at: At = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    resize: ResizeMode = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    r"""Pixel-prototype contrastive loss: cross-entropy of each pixel's cosine logits against its class.

    .. math::
        z[b,k,p] = \cos(\mathbf{f}(b,:,p), \mathbf{P}_{b,k}) / \tau, \qquad
        \ell(b,p) = -\log \operatorname{softmax}_k(z[b,:,p])[y(b,p)]

    with :math:`\cos(a, b) = a^\top b / (\max(\lVert a \rVert, \epsilon) \max(\lVert b \rVert, \epsilon))`.
    Lee et al., ECCV 2022 (arXiv 2207.10892); :func:`fcl_loss` and :func:`bcl_loss` are its two directions.

    Args:
        features: ``Tensor[B, D, h, w]`` pixel features (fp16/bf16 are computed in fp32; fp64 stays fp64).
        prototypes: ``Tensor[B, K, D]`` (prototypes paired with image b) or ``Tensor[K, D]`` (shared), or the
            :class:`~protocl.PooledPrototypes` of :func:`~protocl.masked_average_pool` (validity from its counts).
        labels: ``Tensor[B, H, W]`` (or mmseg's ``Tensor[B, 1, H, W]``) int64 class ids in ``[0, K)`` or
            ``ignore_index``; any ``H, W`` (resized).
        valid: ``Tensor[B, K]`` or ``Tensor[K]`` bool, which prototypes exist (e.g. ``counts > 0`` from
            :func:`~protocl.masked_average_pool`). None: every prototype that is not all zeros (an absent class
            of :func:`~protocl.masked_average_pool`, whose cosine with every pixel would be 0) is valid. Must be
            None when the prototypes are a :class:`~protocl.PooledPrototypes` (their ``counts > 0`` are used).
        temperature: :math:`\tau > 0`.
        class_weight: ``Tensor[K]`` or ``Tensor[B, K]``, the weight of a pixel's term by its class, as the
            ``weight`` of ``F.cross_entropy`` (a ``(K, 1)`` column, as DASS builds it, is flattened).
        pixel_weight: per-pixel weight, not differentiated: ``Tensor[B, H, W]`` (label grid), ``Tensor[B, h, w]``
            (feature grid) or ``Tensor[B]`` (per image, e.g. DAFormer's ``pseudo_weight``); ``(B, 1, ·, ·)`` is
            accepted too. Nearest-resized to the grid of the loss when it is on the other one. It multiplies the
            class weight: "mean" divides by the summed weights of the contributing pixels (so a constant
            weight cancels out of "mean"; use ``"sum"`` to scale).
        absent: ``"mask"`` (invalid prototypes leave the softmax; pixels of their classes do not contribute) or
            ``"min_similarity"`` (invalid prototypes get cosine −1 and stay; their pixels still contribute: the
            authors' release).
        at: ``"feature"`` (labels resized to the feature grid, loss over feature cells) or ``"label"`` (equal to
            cross-entropy at label resolution against logits nearest-upsampled to ``(H, W)``, computed with
            per-cell label histograms, never materialising ``(B, K, H, W)``).
        ignore_index: label id that does not contribute.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. ``"mean"`` is the weighted mean over contributing pixels
            (``F.cross_entropy``'s: :math:`\sum_p w_p \ell_p / \sum_p w_p`, :math:`w_p` = class weight × pixel
            weight); with no contributing pixel (or all weights 0) it is a zero still connected to the graph
            (never NaN).
        resize: label resize for ``at="feature"``: ``"nearest"`` or ``"purity"``.
        min_purity: for ``resize="purity"``, the share of a cell's pixels its majority class needs (else the cell
            is ignored), in ``[0, 1]``.
        eps: norm floor :math:`\epsilon` of the cosine.

    Returns:
        A scalar, or with ``reduction="none"`` the weighted per-pixel loss ``Tensor[B, h, w]`` (``at="feature"``)
        or ``Tensor[B, H, W]`` (``at="label"``), 0 where a pixel does not contribute. fp32 (fp64 for fp64 input).

    Shape:
        - features: :math:`(B, D, h, w)`
        - prototypes: :math:`(B, K, D)` or :math:`(K, D)`
        - labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)`; pixel_weight: :math:`(B, H, W)`, :math:`(B, h, w)`
          or :math:`(B,)`
        - output: scalar, or :math:`(B, h, w)` / :math:`(B, H, W)` with ``reduction="none"``
    Example:
        >>> f = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> y = torch.randint(0, 4, (2, 23, 23))
        >>> P = torch.randn(2, 4, 8)
        >>> loss = pixel_prototype_contrastive_loss(f, P, y, temperature=0.1)
        >>> loss.backward()
        >>> pixel_prototype_contrastive_loss(f, P, y, at="label", reduction="none").shape
        torch.Size([2, 23, 23])
    """
    return _contrastive_loss(
        "pixel_prototype_contrastive_loss", ("features", "prototypes", "labels"),
        features, prototypes, labels,
        valid=valid, temperature=temperature, class_weight=class_weight, pixel_weight=pixel_weight,
        absent=absent, at=at,
        ignore_index=ignore_index, reduction=reduction, resize=resize, min_purity=min_purity, eps=eps,
    )


def fcl_loss(
    target_features: Tensor,
    source_prototypes: Prototypes,
    target_labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = TEMPERATURE,
    class_weight: Optional[Tensor] = None,
    pixel_weight: Optional[Tensor] = None,
    absent: Absent = "mask",
    at: At = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    resize: ResizeMode = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    r"""Forward contrastive loss (FCL): target pixels against source prototypes.

    Pulls each target pixel feature towards the source prototype of its (pseudo) class and away from the other
    classes' source prototypes: :func:`pixel_prototype_contrastive_loss` with target features, source
    prototypes and target (hybrid pseudo) labels,

    .. math::
        \mathcal{L}_{FCL} = \operatorname{mean}_{b,p}
        -\log \frac{\exp(\cos(\mathbf{f}_T(b,p), \mathbf{p}_S(b, y_T)) / \tau)}
                   {\sum_k \exp(\cos(\mathbf{f}_T(b,p), \mathbf{p}_S(b, k)) / \tau)}

    Args:
        target_features: ``Tensor[B, D, h, w]``, the ``features`` of :func:`pixel_prototype_contrastive_loss`.
        source_prototypes: ``Tensor[B, K, D]``, ``Tensor[K, D]`` or :class:`~protocl.PooledPrototypes` of the
            source, its ``prototypes``.
        target_labels: ``Tensor[B, H, W]`` (or ``Tensor[B, 1, H, W]``) target pseudo labels, its ``labels``.

    The keywords (``valid``, ``temperature``, ``class_weight``, ``pixel_weight``, ``absent``, ``at``,
    ``ignore_index``, ``reduction``, ``resize``, ``min_purity``, ``eps``) and the result are those of
    :func:`pixel_prototype_contrastive_loss`, with its defaults and meaning.

    Shape:
        - target_features: :math:`(B, D, h, w)`
        - source_prototypes: :math:`(B, K, D)` or :math:`(K, D)`
        - target_labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)`
        - output: scalar, or :math:`(B, h, w)` / :math:`(B, H, W)` with ``reduction="none"``

    Example:
        >>> from protocl import masked_average_pool
        >>> f_s, f_t = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> y_s, y_t = torch.randint(0, 4, (2, 24, 24)), torch.randint(0, 4, (2, 24, 24))
        >>> source = masked_average_pool(f_s, y_s, 4)  # PooledPrototypes(prototypes, counts)
        >>> fcl_loss(f_t, source, y_t).backward()  # validity from source.counts > 0
    """
    return _contrastive_loss(
        "fcl_loss", ("target_features", "source_prototypes", "target_labels"),
        target_features, source_prototypes, target_labels,
        valid=valid, temperature=temperature, class_weight=class_weight, pixel_weight=pixel_weight,
        absent=absent, at=at,
        ignore_index=ignore_index, reduction=reduction, resize=resize, min_purity=min_purity, eps=eps,
    )


def bcl_loss(
    source_features: Tensor,
    target_prototypes: Prototypes,
    source_labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = TEMPERATURE,
    class_weight: Optional[Tensor] = None,
    pixel_weight: Optional[Tensor] = None,
    absent: Absent = "mask",
    at: At = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: Reduction = "mean",
    resize: ResizeMode = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    r"""Backward contrastive loss (BCL): source pixels against target prototypes.

    The same quantity as :func:`fcl_loss` in the other direction: :func:`pixel_prototype_contrastive_loss` with
    source features, target prototypes (pooled from target features with the hybrid pseudo labels) and source
    ground truth,

    .. math::
        \mathcal{L}_{BCL} = \operatorname{mean}_{b,p}
        -\log \frac{\exp(\cos(\mathbf{f}_S(b,p), \mathbf{p}_T(b, y_S)) / \tau)}
                   {\sum_k \exp(\cos(\mathbf{f}_S(b,p), \mathbf{p}_T(b, k)) / \tau)}

    Args:
        source_features: ``Tensor[B, D, h, w]``, the ``features`` of :func:`pixel_prototype_contrastive_loss`.
        target_prototypes: ``Tensor[B, K, D]``, ``Tensor[K, D]`` or :class:`~protocl.PooledPrototypes` of the
            target, its ``prototypes``.
        source_labels: ``Tensor[B, H, W]`` (or ``Tensor[B, 1, H, W]``) source ground truth, its ``labels``.

    The keywords (``valid``, ``temperature``, ``class_weight``, ``pixel_weight``, ``absent``, ``at``,
    ``ignore_index``, ``reduction``, ``resize``, ``min_purity``, ``eps``) and the result are those of
    :func:`pixel_prototype_contrastive_loss`, with its defaults and meaning.

    Shape:
        - source_features: :math:`(B, D, h, w)`
        - target_prototypes: :math:`(B, K, D)` or :math:`(K, D)`
        - source_labels: :math:`(B, H, W)` or :math:`(B, 1, H, W)`
        - output: scalar, or :math:`(B, h, w)` / :math:`(B, H, W)` with ``reduction="none"``

    Example:
        >>> f_s = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> p_t = torch.randn(2, 4, 8)
        >>> bcl_loss(f_s, p_t, torch.randint(0, 4, (2, 24, 24))).backward()
    """
    return _contrastive_loss(
        "bcl_loss", ("source_features", "target_prototypes", "source_labels"),
        source_features, target_prototypes, source_labels,
        valid=valid, temperature=temperature, class_weight=class_weight, pixel_weight=pixel_weight,
        absent=absent, at=at,
        ignore_index=ignore_index, reduction=reduction, resize=resize, min_purity=min_purity, eps=eps,
    )


def _overlap_sizes(size: Any) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``(h, w)`` for both maps, or ``((h_s, w_s), (h_t, w_t))`` one per map."""
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, (tuple, list, torch.Size)) for v in size):
        return check_size2(size[0], "size[0] (the source grid)"), check_size2(size[1], "size[1] (the target grid)")
    one = check_size2(size, "size")
    return one, one


def overlap_class_weight(
    source_labels: Tensor,
    target_labels: Tensor,
    num_classes: int,
    *,
    size: Union[Tuple[int, int], Tuple[Tuple[int, int], Tuple[int, int]]],
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""The release's class weight of FCL and BCL: 1 for classes present in both label maps after nearest resize.

    .. math::
        w[b, k] = [\exists p: y_S^{\downarrow}(b, p) = k] \cdot [\exists p: y_T^{\downarrow}(b, p) = k]

    Each map is resized to its own feature grid, as the release does (``label_s`` to the source features' grid,
    ``label_t`` to the target features'): pass ``size=((h_s, w_s), (h_t, w_t))`` when the grids differ (source
    and target crops of different sizes); ``size=(h, w)`` resizes both to the same grid.

    Args:
        source_labels: ``Tensor[B, H, W]`` (or ``Tensor[B, 1, H, W]``) int64.
        target_labels: ``Tensor[B, H', W']`` (or ``Tensor[B, 1, H', W']``) int64.
        num_classes: K.
        size: the feature grid ``(h, w)`` of both maps, or one grid per map ``((h_s, w_s), (h_t, w_t))``.
        ignore_index: label id that marks no class.

    Returns:
        ``Tensor[B, K]`` float32 of 0/1.

    Shape:
        - source_labels, target_labels: :math:`(B, H, W)`; output: :math:`(B, K)`

    Example:
        >>> y_s = torch.tensor([[[0, 1], [1, 1]]]); y_t = torch.tensor([[[1, 2], [2, 255]]])
        >>> overlap_class_weight(y_s, y_t, 3, size=(2, 2))
        tensor([[0., 1., 0.]])
        >>> overlap_class_weight(y_s, y_t, 3, size=((2, 2), (1, 1)))  # y_t on a 1x1 grid: class 1
        tensor([[0., 1., 0.]])
    """
    report_pending()
    source_labels = label_map(source_labels, "source_labels")
    target_labels = label_map(target_labels, "target_labels")
    check_same_device("source_labels", source_labels, "target_labels", target_labels)
    if source_labels.shape[0] != target_labels.shape[0]:
        raise ValueError(
            f"target_labels: expected batch size {source_labels.shape[0]} (the batch of source_labels), "
            f"got shape {tuple(target_labels.shape)}"
        )
    num_classes = check_int(num_classes, "num_classes", 1)
    size_s, size_t = _overlap_sizes(size)
    check_ignore_index(ignore_index)
    check_label_values(source_labels, num_classes, ignore_index, "source_labels", "overlap_class_weight")
    check_label_values(target_labels, num_classes, ignore_index, "target_labels", "overlap_class_weight")
    both = kernels.presence(source_labels, size_s, num_classes, ignore_index) & kernels.presence(
        target_labels, size_t, num_classes, ignore_index
    )
    return both.to(torch.float32)


class PixelPrototypeContrastiveLoss(nn.Module):
    r"""Module form of :func:`pixel_prototype_contrastive_loss` (settings stored, ``forward`` is one call).

    The keyword arguments (``temperature``, ``absent``, ``at``, ``ignore_index``, ``reduction``, ``resize``,
    ``min_purity``, ``eps``) mean what they mean in :func:`pixel_prototype_contrastive_loss` (stored in
    ``settings``, a frozen dataclass, and ``reduction``); ``valid``, ``class_weight`` and ``pixel_weight`` are
    passed per call.

    Shape:
        - features: :math:`(B, D, h, w)`; prototypes: :math:`(B, K, D)` or :math:`(K, D)`; labels: :math:`(B, H, W)`

    Example:
        >>> crit = PixelPrototypeContrastiveLoss(temperature=0.1)
        >>> crit(torch.randn(1, 4, 3, 3), torch.randn(2, 4), torch.randint(0, 2, (1, 5, 5))).shape
        torch.Size([])
    """

    def __init__(
        self,
        *,
        temperature: float = TEMPERATURE,
        absent: Absent = "mask",
        at: At = "feature",
        ignore_index: int = IGNORE_INDEX,
        reduction: Reduction = "mean",
        resize: ResizeMode = "nearest",
        min_purity: float = MIN_PURITY,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        self.settings = contrast_settings(
            temperature=temperature, absent=absent, at=at, ignore_index=ignore_index, resize=resize,
            min_purity=min_purity, eps=eps,
        )
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        s = self.settings
        return f"temperature={s.temperature}, absent={s.absent!r}, at={s.at!r}, reduction={self.reduction!r}"

    def forward(
        self,
        features: Tensor,
        prototypes: Prototypes,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        class_weight: Optional[Tensor] = None,
        pixel_weight: Optional[Tensor] = None,
    ) -> Tensor:
        return pixel_prototype_contrastive_loss(
            features, prototypes, labels, valid=valid, class_weight=class_weight, pixel_weight=pixel_weight,
            reduction=self.reduction, **dataclasses.asdict(self.settings),
        )
