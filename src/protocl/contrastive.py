"""Pixel-prototype contrastive loss, and its two directions FCL (target pixels vs source prototypes) and BCL
(source pixels vs target prototypes). The protocl method spec, §3 and §6.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor, nn

from ._reduction import check_reduction, reduce_loss
from ._validation import (
    IGNORE_INDEX,
    check_bool_tensor,
    check_choice,
    check_dim_size,
    check_float_tensor,
    check_ignore_index,
    check_int,
    check_label_tensor,
    check_label_values,
    check_positive,
    check_range,
    check_same_device,
    check_size2,
    compute_dtype,
    shape_in,
)
from .prototypes import no_autocast
from .resize import MIN_PURITY, RESIZE_MODES, _cell_index, _label_histogram, _resize_labels, known_labels

__all__ = [
    "pixel_prototype_contrastive_loss",
    "fcl_loss",
    "bcl_loss",
    "overlap_class_weight",
    "cosine_similarity_map",
    "PixelPrototypeContrastiveLoss",
]

ABSENT_MODES = ("mask", "min_similarity")
AT_MODES = ("feature", "label")
EPS = 1e-6


# ----------------------------------------------------------------------------------------------- core maths


def cosine_similarity_map(features: Tensor, prototypes: Tensor, eps: float = EPS) -> Tensor:
    r"""Cosine similarity of every pixel feature with every prototype.

    .. math::
        s[b, k, p] = \frac{\mathbf{f}(b, :, p)^\top \mathbf{P}_{b,k}}
                          {\max(\lVert \mathbf{f}(b, :, p) \rVert, \epsilon)\, \max(\lVert \mathbf{P}_{b,k} \rVert, \epsilon)}

    Computed in fp32 (fp64 for fp64 inputs) with autocast off; no ``(B, K, D, h, w)`` temporary.

    Args:
        features: ``Tensor[B, D, h, w]``.
        prototypes: ``Tensor[B, K, D]`` (paired with image b) or ``Tensor[K, D]`` (shared).
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
    check_features_prototypes(features, prototypes, None, "features", "prototypes")
    check_positive(eps, "eps")
    return _cosine_similarity_map(features, prototypes, float(eps))


def _cosine_similarity_map(features: Tensor, prototypes: Tensor, eps: float) -> Tensor:
    """:func:`cosine_similarity_map` without validation (arguments checked by the caller)."""
    dtype = compute_dtype(features, prototypes)
    h, w = features.shape[-2:]
    with no_autocast(features):
        f = rearrange(features.to(dtype), "b d h w -> b d (h w)")
        p = prototypes.to(dtype)
        # 1 / max(||x||, eps) = rsqrt(max(||x||^2, eps^2)), folded into the (B, K, N) products rather than
        # normalising the (B, D, N) features: one cheap pass over D in the forward and in the backward
        f_inv = (f * f).sum(dim=1).clamp_min(eps * eps).rsqrt()  # b n
        p_inv = (p * p).sum(dim=-1).clamp_min(eps * eps).rsqrt()  # (b) k
        if p.ndim == 2:
            dot = torch.einsum("kd,bdn->bkn", p, f)
            cos = dot * p_inv[None, :, None] * f_inv[:, None, :]
        else:
            dot = torch.einsum("bkd,bdn->bkn", p, f)
            cos = dot * p_inv[:, :, None] * f_inv[:, None, :]
    return rearrange(cos, "b k (h w) -> b k h w", h=h, w=w)


def _log_probs(
    features: Tensor, prototypes: Tensor, valid: Tensor, temperature: float, absent: str, eps: float
) -> Tensor:
    """log softmax over classes of the cosine logits, invalid prototypes masked or at similarity −1."""
    z = _cosine_similarity_map(features, prototypes, eps) / temperature  # b k h w
    keep = valid[:, :, None, None]
    if absent == "mask":
        # a finite "minus infinity": exp underflows to exactly 0, and an image with no valid prototype at all
        # still gives finite values (its pixels do not contribute), so no NaN reaches the gradients.
        fill = torch.full_like(z, torch.finfo(z.dtype).min)
    else:
        fill = torch.full_like(z, -1.0 / temperature)
    return torch.log_softmax(torch.where(keep, z, fill), dim=1)


def _class_weights(
    B: int, K: int, valid: Tensor, class_weight: Optional[Tensor], absent: str, dtype, device
) -> Tensor:
    """Weight of a pixel of class k in image b: ``(B, K)``, 0 for classes that do not contribute."""
    w = torch.ones(B, K, dtype=dtype, device=device)
    if class_weight is not None:
        w = w * class_weight.to(dtype)
    if absent == "mask":
        w = torch.where(valid, w, torch.zeros_like(w))
    return w


def _terms_at_grid(logp: Tensor, y: Tensor, cw: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per-pixel weighted loss and weight on the grid of ``y`` (``logp`` on the same grid): ``(B, h, w)`` each."""
    known = known_labels(y, logp.shape[1], ignore_index)
    y0 = torch.where(known, y, torch.zeros_like(y))
    nll = -logp.gather(1, y0[:, None]).squeeze(1)  # b h w
    weight = torch.where(known, cw.gather(1, rearrange(y0, "b h w -> b (h w)")).view_as(y0), torch.zeros_like(nll))
    return torch.where(weight != 0, weight * nll, torch.zeros_like(nll)), weight


def _terms_at_label_pixels(logp: Tensor, labels: Tensor, cw: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Per label pixel loss of nearest-upsampled logits, by gathering (``(B, H, W)`` each, never ``(B, K, H, W)``)."""
    B, K, h, w = logp.shape
    H, W = labels.shape[-2:]
    cell = _cell_index((H, W), (h, w), labels.device)  # H W
    known = known_labels(labels, K, ignore_index)
    y0 = torch.where(known, labels, torch.zeros_like(labels))
    index = rearrange(y0 * (h * w) + cell, "b H W -> b (H W)")
    nll = -rearrange(logp, "b k h w -> b (k h w)").gather(1, index).view(B, H, W)
    weight = torch.where(known, cw.gather(1, rearrange(y0, "b H W -> b (H W)")).view(B, H, W), torch.zeros_like(nll))
    return torch.where(weight != 0, weight * nll, torch.zeros_like(nll)), weight


def _terms_by_histogram(logp: Tensor, labels: Tensor, cw: Tensor, ignore_index: int) -> Tuple[Tensor, Tensor]:
    """Label-resolution CE as per-cell class histograms: ``(B, K, h, w)`` loss and weight whose sums equal the
    sums over label pixels of nearest-upsampled logits."""
    B, K, h, w = logp.shape
    hist = _label_histogram(labels, (h, w), K, ignore_index).to(logp.dtype)  # b k h w
    weight = hist * cw[:, :, None, None]
    return torch.where(weight != 0, -weight * logp, torch.zeros_like(logp)), weight


def contrastive_terms(
    features: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    valid: Optional[Tensor],
    temperature: float,
    class_weight: Optional[Tensor],
    absent: str,
    at: str,
    ignore_index: int,
    resize: str,
    eps: float,
    per_pixel: bool,
    min_purity: float = MIN_PURITY,
) -> Tuple[Tensor, Tensor]:
    """Unreduced weighted loss and weight, batch first. Arguments are assumed validated.

    ``at="feature"``: ``(B, h, w)``. ``at="label"``: ``(B, H, W)`` when ``per_pixel`` else the equivalent
    ``(B, K, h, w)`` histogram form (same sums, cheaper).
    """
    B = features.shape[0]
    K = prototypes.shape[-2]
    labels = labels.long()
    if valid is None:
        valid = torch.ones(B, K, dtype=torch.bool, device=features.device)
    valid = valid.expand(B, K)
    logp = _log_probs(features, prototypes, valid, temperature, absent, eps)
    cw = class_weight.expand(B, K) if class_weight is not None else None
    cw = _class_weights(B, K, valid, cw, absent, logp.dtype, logp.device)
    if at == "feature":
        y = _resize_labels(labels, tuple(features.shape[-2:]), resize, K, ignore_index, min_purity)
        return _terms_at_grid(logp, y, cw, ignore_index)
    if per_pixel:
        return _terms_at_label_pixels(logp, labels, cw, ignore_index)
    return _terms_by_histogram(logp, labels, cw, ignore_index)


# ----------------------------------------------------------------------------------------------- validation


def check_features_prototypes(features, prototypes, valid, fname: str, pname: str) -> Tuple[int, int]:
    """Check pixel features ``(B, D, h, w)``, prototypes ``(B, K, D)``/``(K, D)`` and ``valid``; return B, K."""
    check_float_tensor(features, fname, (4,), "(B, D, h, w)")
    check_float_tensor(prototypes, pname, (2, 3), "(B, K, D) or (K, D)")
    check_same_device(fname, features, pname, prototypes)
    B, D = features.shape[:2]
    check_dim_size(prototypes, -1, D, pname, f"D, the channels of {fname} {tuple(features.shape)}")
    if prototypes.ndim == 3:
        check_dim_size(prototypes, 0, B, pname, f"B, the batch of {fname} {tuple(features.shape)}")
    K = prototypes.shape[-2]
    if valid is not None:
        check_bool_tensor(valid, "valid", (1, 2), "(B, K) or (K,)")
        check_same_device(fname, features, "valid", valid)
        if not shape_in(valid.shape, (K,), (B, K)):
            raise ValueError(f"valid: expected shape {(K,)} or {(B, K)}, got {tuple(valid.shape)}")
    return B, K


def validate_contrastive(
    features,
    prototypes,
    labels,
    valid,
    temperature,
    class_weight,
    absent,
    at,
    ignore_index,
    reduction,
    resize,
    eps,
    names=("features", "prototypes", "labels"),
    min_purity=MIN_PURITY,
) -> None:
    fname, pname, lname = names
    B, K = check_features_prototypes(features, prototypes, valid, fname, pname)
    check_label_tensor(labels, lname, (3,), "(B, H, W)")
    check_same_device(fname, features, lname, labels)
    if labels.shape[0] != B:
        raise ValueError(f"{lname}: expected batch size {B} (the batch of {fname}), got shape {tuple(labels.shape)}")
    check_positive(temperature, "temperature")
    if class_weight is not None:
        check_float_tensor(class_weight, "class_weight", (1, 2), "(K,) or (B, K)")
        check_same_device(fname, features, "class_weight", class_weight)
        if not shape_in(class_weight.shape, (K,), (B, K)):
            raise ValueError(f"class_weight: expected shape {(K,)} or {(B, K)}, got {tuple(class_weight.shape)}")
    check_choice(absent, "absent", ABSENT_MODES)
    check_choice(at, "at", AT_MODES)
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    check_choice(resize, "resize", RESIZE_MODES)
    check_range(min_purity, "min_purity", 0.0, 1.0)
    check_positive(eps, "eps")
    check_label_values(labels, K, ignore_index, lname)


# ----------------------------------------------------------------------------------------------- public


_DOC_ARGS = r"""
    Args:
        {f}: ``Tensor[B, D, h, w]`` pixel features (fp16/bf16 are computed in fp32; fp64 stays fp64).
        {p}: ``Tensor[B, K, D]`` (prototypes paired with image b) or ``Tensor[K, D]`` (shared).
        {l}: ``Tensor[B, H, W]`` int64 class ids in ``[0, K)`` or ``ignore_index``; any ``H, W`` (resized).
        valid: ``Tensor[B, K]`` or ``Tensor[K]`` bool, which prototypes exist (e.g. ``counts > 0`` from
            :func:`~protocl.masked_average_pool`). None: all are valid.
        temperature: :math:`\tau > 0`.
        class_weight: ``Tensor[K]`` or ``Tensor[B, K]``, the weight of a pixel's term by its class, as the
            ``weight`` of ``F.cross_entropy``.
        absent: ``"mask"`` (invalid prototypes leave the softmax; pixels of their classes do not contribute) or
            ``"min_similarity"`` (invalid prototypes get cosine −1 and stay; their pixels still contribute: the
            authors' release).
        at: ``"feature"`` (labels resized to the feature grid, loss over feature cells) or ``"label"`` (equal to
            cross-entropy at label resolution against logits nearest-upsampled to ``(H, W)``, computed with
            per-cell label histograms, never materialising ``(B, K, H, W)``).
        ignore_index: label id that does not contribute.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``. ``"mean"`` is the class-weighted mean over contributing
            pixels (``F.cross_entropy``'s); with no contributing pixel it is a zero still connected to the graph
            (never NaN).
        resize: label resize for ``at="feature"``: ``"nearest"`` or ``"purity"``.
        min_purity: for ``resize="purity"``, the share of a cell's pixels its majority class needs (else the cell
            is ignored), in ``[0, 1]``.
        eps: norm floor :math:`\epsilon` of the cosine.

    Returns:
        A scalar, or with ``reduction="none"`` the weighted per-pixel loss ``Tensor[B, h, w]`` (``at="feature"``)
        or ``Tensor[B, H, W]`` (``at="label"``), 0 where a pixel does not contribute. fp32 (fp64 for fp64 input).

    Shape:
        - {f}: :math:`(B, D, h, w)`
        - {p}: :math:`(B, K, D)` or :math:`(K, D)`
        - {l}: :math:`(B, H, W)`
        - output: scalar, or :math:`(B, h, w)` / :math:`(B, H, W)` with ``reduction="none"``
"""


def pixel_prototype_contrastive_loss(
    features: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = 0.1,
    class_weight: Optional[Tensor] = None,
    absent: str = "mask",
    at: str = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    resize: str = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    return _loss(
        features, prototypes, labels, valid, temperature, class_weight, absent, at, ignore_index, reduction,
        resize, eps, ("features", "prototypes", "labels"), min_purity,
    )


pixel_prototype_contrastive_loss.__doc__ = (
    r"""Pixel-prototype contrastive loss: cross-entropy of each pixel's cosine logits against its class.

    .. math::
        z[b,k,p] = \cos(\mathbf{f}(b,:,p), \mathbf{P}_{b,k}) / \tau, \qquad
        \ell(b,p) = -\log \operatorname{softmax}_k(z[b,:,p])[y(b,p)]

    with :math:`\cos(a, b) = a^\top b / (\max(\lVert a \rVert, \epsilon) \max(\lVert b \rVert, \epsilon))`.
    Lee et al., ECCV 2022 (arXiv 2207.10892); :func:`fcl_loss` and :func:`bcl_loss` are its two directions.
"""
    + _DOC_ARGS.format(f="features", p="prototypes", l="labels")
    + r"""
    Example:
        >>> f = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> y = torch.randint(0, 4, (2, 23, 23))
        >>> P = torch.randn(2, 4, 8)
        >>> loss = pixel_prototype_contrastive_loss(f, P, y, temperature=0.1)
        >>> loss.backward()
        >>> pixel_prototype_contrastive_loss(f, P, y, at="label", reduction="none").shape
        torch.Size([2, 23, 23])
    """
)


def _loss(features, prototypes, labels, valid, temperature, class_weight, absent, at, ignore_index, reduction,
          resize, eps, names, min_purity) -> Tensor:
    validate_contrastive(
        features, prototypes, labels, valid, temperature, class_weight, absent, at, ignore_index, reduction,
        resize, eps, names, min_purity,
    )
    loss, weight = contrastive_terms(
        features, prototypes, labels, valid, float(temperature), class_weight, absent, at, ignore_index, resize,
        float(eps), per_pixel=reduction == "none", min_purity=float(min_purity),
    )
    return reduce_loss(loss, reduction, weight)


def fcl_loss(
    target_features: Tensor,
    source_prototypes: Tensor,
    target_labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = 0.1,
    class_weight: Optional[Tensor] = None,
    absent: str = "mask",
    at: str = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    resize: str = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    return _loss(
        target_features, source_prototypes, target_labels, valid, temperature, class_weight, absent, at,
        ignore_index, reduction, resize, eps, ("target_features", "source_prototypes", "target_labels"), min_purity,
    )


fcl_loss.__doc__ = (
    r"""Forward contrastive loss (FCL): target pixels against source prototypes.

    Pulls each target pixel feature towards the source prototype of its (pseudo) class and away from the other
    classes' source prototypes; :func:`pixel_prototype_contrastive_loss` with target features, source
    prototypes and target (hybrid pseudo) labels:

    .. math::
        \mathcal{L}_{FCL} = \operatorname{mean}_{b,p}
        -\log \frac{\exp(\cos(\mathbf{f}_T(b,p), \mathbf{p}_S(b, y_T)) / \tau)}
                   {\sum_k \exp(\cos(\mathbf{f}_T(b,p), \mathbf{p}_S(b, k)) / \tau)}
"""
    + _DOC_ARGS.format(f="target_features", p="source_prototypes", l="target_labels")
    + r"""
    Example:
        >>> from protocl import masked_average_pool
        >>> f_s, f_t = torch.randn(2, 8, 6, 6), torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> y_s, y_t = torch.randint(0, 4, (2, 24, 24)), torch.randint(0, 4, (2, 24, 24))
        >>> p_s, n_s = masked_average_pool(f_s, y_s, 4)
        >>> fcl_loss(f_t, p_s, y_t, valid=n_s > 0).backward()
    """
)


def bcl_loss(
    source_features: Tensor,
    target_prototypes: Tensor,
    source_labels: Tensor,
    *,
    valid: Optional[Tensor] = None,
    temperature: float = 0.1,
    class_weight: Optional[Tensor] = None,
    absent: str = "mask",
    at: str = "feature",
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    resize: str = "nearest",
    min_purity: float = MIN_PURITY,
    eps: float = EPS,
) -> Tensor:
    return _loss(
        source_features, target_prototypes, source_labels, valid, temperature, class_weight, absent, at,
        ignore_index, reduction, resize, eps, ("source_features", "target_prototypes", "source_labels"), min_purity,
    )


bcl_loss.__doc__ = (
    r"""Backward contrastive loss (BCL): source pixels against target prototypes.

    The same quantity as :func:`fcl_loss` in the other direction: source features, target prototypes (pooled
    from target features with the hybrid pseudo labels) and source ground truth:

    .. math::
        \mathcal{L}_{BCL} = \operatorname{mean}_{b,p}
        -\log \frac{\exp(\cos(\mathbf{f}_S(b,p), \mathbf{p}_T(b, y_S)) / \tau)}
                   {\sum_k \exp(\cos(\mathbf{f}_S(b,p), \mathbf{p}_T(b, k)) / \tau)}
"""
    + _DOC_ARGS.format(f="source_features", p="target_prototypes", l="source_labels")
    + r"""
    Example:
        >>> f_s = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> p_t = torch.randn(2, 4, 8)
        >>> bcl_loss(f_s, p_t, torch.randint(0, 4, (2, 24, 24))).backward()
    """
)


def overlap_class_weight(
    source_labels: Tensor,
    target_labels: Tensor,
    num_classes: int,
    *,
    size: Tuple[int, int],
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""The release's class weight of FCL and BCL: 1 for classes present in both label maps after nearest resize.

    .. math::
        w[b, k] = [\exists p: y_S^{\downarrow}(b, p) = k] \cdot [\exists p: y_T^{\downarrow}(b, p) = k]

    Args:
        source_labels: ``Tensor[B, H, W]`` int64.
        target_labels: ``Tensor[B, H', W']`` int64.
        num_classes: K.
        size: the feature grid ``(h, w)`` both maps are nearest-resized to.
        ignore_index: label id that marks no class.

    Returns:
        ``Tensor[B, K]`` float32 of 0/1.

    Shape:
        - source_labels, target_labels: :math:`(B, H, W)`; output: :math:`(B, K)`

    Example:
        >>> y_s = torch.tensor([[[0, 1], [1, 1]]]); y_t = torch.tensor([[[1, 2], [2, 255]]])
        >>> overlap_class_weight(y_s, y_t, 3, size=(2, 2))
        tensor([[0., 1., 0.]])
    """
    check_label_tensor(source_labels, "source_labels", (3,), "(B, H, W)")
    check_label_tensor(target_labels, "target_labels", (3,), "(B, H, W)")
    check_same_device("source_labels", source_labels, "target_labels", target_labels)
    if source_labels.shape[0] != target_labels.shape[0]:
        raise ValueError(
            f"target_labels: expected batch size {source_labels.shape[0]} (the batch of source_labels), "
            f"got shape {tuple(target_labels.shape)}"
        )
    num_classes = check_int(num_classes, "num_classes", 1)
    size = check_size2(size, "size")
    check_ignore_index(ignore_index)
    check_label_values(source_labels, num_classes, ignore_index, "source_labels")
    check_label_values(target_labels, num_classes, ignore_index, "target_labels")
    both = _presence(source_labels, size, num_classes, ignore_index) & _presence(
        target_labels, size, num_classes, ignore_index
    )
    return both.to(torch.float32)


def _presence(labels: Tensor, size, num_classes: int, ignore_index: int) -> Tensor:
    y = _resize_labels(labels.long(), size, "nearest", num_classes, ignore_index)
    classes = torch.arange(num_classes, device=labels.device)
    y = rearrange(y, "b h w -> b 1 (h w)")
    return ((y == classes[None, :, None]) & (y != ignore_index)).any(-1)  # b k


class PixelPrototypeContrastiveLoss(nn.Module):
    r"""Module form of :func:`pixel_prototype_contrastive_loss` (settings stored, ``forward`` is one call).

    The keyword arguments (``temperature``, ``absent``, ``at``, ``ignore_index``, ``reduction``, ``resize``,
    ``min_purity``, ``eps``) mean what they mean in :func:`pixel_prototype_contrastive_loss`; ``valid`` and ``class_weight`` are
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
        temperature: float = 0.1,
        absent: str = "mask",
        at: str = "feature",
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        resize: str = "nearest",
        min_purity: float = MIN_PURITY,
        eps: float = EPS,
    ) -> None:
        super().__init__()
        self.temperature = check_positive(temperature, "temperature")
        self.absent = check_choice(absent, "absent", ABSENT_MODES)
        self.at = check_choice(at, "at", AT_MODES)
        self.ignore_index = check_ignore_index(ignore_index)
        self.reduction = check_reduction(reduction)
        self.resize = check_choice(resize, "resize", RESIZE_MODES)
        self.min_purity = check_range(min_purity, "min_purity", 0.0, 1.0)
        self.eps = check_positive(eps, "eps")

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, absent={self.absent!r}, at={self.at!r}, reduction={self.reduction!r}"

    def forward(
        self,
        features: Tensor,
        prototypes: Tensor,
        labels: Tensor,
        valid: Optional[Tensor] = None,
        class_weight: Optional[Tensor] = None,
    ) -> Tensor:
        return pixel_prototype_contrastive_loss(
            features, prototypes, labels, valid=valid, temperature=self.temperature, class_weight=class_weight,
            absent=self.absent, at=self.at, ignore_index=self.ignore_index, reduction=self.reduction,
            resize=self.resize, min_purity=self.min_purity, eps=self.eps,
        )
