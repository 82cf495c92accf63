"""The pixel-prototype contrastive loss (FCL, BCL), its reduction, and the release's overlap class weight (see
:mod:`protocl.contrastive`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .._types import EPS, IGNORE_INDEX, MIN_PURITY, TEMPERATURE, Absent, At, ResizeMode
from .cosine import compute_features, cosine, validity
from .dtypes import no_autocast
from .resize import cell_index, grid_of, known_labels, label_histogram, resize_labels, upsample_rule


@dataclass(frozen=True)
class ContrastSettings:
    """The settings of one contrastive term (validated by the public functions and modules that build it)."""

    temperature: float = TEMPERATURE
    absent: Absent = "mask"
    at: At = "feature"
    ignore_index: int = IGNORE_INDEX
    resize: ResizeMode = "nearest"
    min_purity: float = MIN_PURITY
    eps: float = EPS


def class_weights(valid: Tensor, class_weight: Optional[Tensor], absent: Absent, dtype: torch.dtype) -> Tensor:
    """Weight of a pixel of class k in image b: ``(B, K)``, 0 for classes that do not contribute."""
    w = torch.ones(valid.shape, dtype=dtype, device=valid.device)
    if class_weight is not None:
        w = w * class_weight.to(dtype)
    if absent == "mask":
        w = torch.where(valid, w, torch.zeros_like(w))
    return w


def _terms_at_grid(
    logp: Tensor, y: Tensor, cw: Tensor, pw: Optional[Tensor], ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """Per-pixel weighted loss and weight on the grid of ``y`` (``logp`` and the pixel weight ``pw`` on the same
    grid, or ``pw`` ``(B, 1, 1)``): ``(B, h, w)`` each."""
    known = known_labels(y, logp.shape[1], ignore_index)
    y0 = torch.where(known, y, torch.zeros_like(y))
    nll = -logp.gather(1, y0[:, None]).squeeze(1)  # b h w
    weight = torch.where(known, cw.gather(1, rearrange(y0, "b h w -> b (h w)")).view_as(y0), torch.zeros_like(nll))
    if pw is not None:
        weight = weight * pw
    return torch.where(weight != 0, weight * nll, torch.zeros_like(nll)), weight


def _terms_at_label_pixels(
    logp: Tensor, labels: Tensor, cw: Tensor, pw: Optional[Tensor], ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """Per label pixel loss of nearest-upsampled logits, by gathering (``(B, H, W)`` each, never ``(B, K, H, W)``);
    ``pw`` is the pixel weight on the label grid (or ``(B, 1, 1)``)."""
    B, K, h, w = logp.shape
    H, W = labels.shape[-2:]
    cell = cell_index((H, W), (h, w), labels.device, upsample_rule((H, W), labels.device, logp.dtype))  # H W
    known = known_labels(labels, K, ignore_index)
    y0 = torch.where(known, labels, torch.zeros_like(labels))
    index = rearrange(y0 * (h * w) + cell, "b H W -> b (H W)")
    nll = -rearrange(logp, "b k h w -> b (k h w)").gather(1, index).view(B, H, W)
    weight = torch.where(known, cw.gather(1, rearrange(y0, "b H W -> b (H W)")).view(B, H, W), torch.zeros_like(nll))
    if pw is not None:
        weight = weight * pw
    return torch.where(weight != 0, weight * nll, torch.zeros_like(nll)), weight


def _terms_by_histogram(
    logp: Tensor, labels: Tensor, cw: Tensor, pw: Optional[Tensor], ignore_index: int
) -> Tuple[Tensor, Tensor]:
    """Label-resolution CE as per-cell class histograms: ``(B, K, h, w)`` loss and weight whose sums equal the
    sums over label pixels of nearest-upsampled logits. ``pw``: pixel weights on the label grid ``(B, H, W)``
    (summed into the histogram), on the feature grid ``(B, 1, h, w)``, or per image ``(B, 1, 1, 1)``."""
    B, K, h, w = logp.shape
    H, W = labels.shape[-2:]
    rule = upsample_rule((H, W), labels.device, logp.dtype)
    label_grid = pw is not None and pw.ndim == 3
    hist = label_histogram(
        labels, (h, w), K, ignore_index, rule=rule, values=pw if label_grid else None, dtype=logp.dtype
    )  # b k h w
    weight = hist * cw[:, :, None, None]
    if pw is not None and not label_grid:
        weight = weight * pw
    return torch.where(weight != 0, -weight * logp, torch.zeros_like(logp)), weight


def _pixel_weight_at(
    pixel_weight: Optional[Tensor], grid: Tuple[int, int], other: Tuple[int, int], rule: torch.dtype,
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """The pixel weight ``(B,)``/``(B, ·, ·)`` on ``grid`` (``(B, 1, 1)`` for per-image weights): taken as is
    when it is on ``grid``, else resized from ``other`` by nearest neighbour (``rule``), detached, in ``dtype``."""
    if pixel_weight is None:
        return None
    pw = pixel_weight.detach().to(dtype)
    if pw.ndim == 1:
        return pw[:, None, None]
    if tuple(pw.shape[-2:]) == tuple(grid):
        return pw
    B = pw.shape[0]
    cell = cell_index(grid, other, pw.device, rule).reshape(-1)  # each pixel of grid reads its source on other
    return pw.reshape(B, -1).index_select(1, cell).view(B, *grid)


def contrastive_terms(
    features: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    valid: Optional[Tensor],
    class_weight: Optional[Tensor],
    s: ContrastSettings,
    *,
    per_pixel: bool = False,
    phi: Optional[Tensor] = None,
    pixel_weight: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    r"""Unreduced weighted loss and weight of :func:`protocl.pixel_prototype_contrastive_loss`, batch first.

    .. math::
        \log q[b,k,p] = \operatorname{log\,softmax}_k \big(\cos(\mathbf{f}(b,:,p), \mathbf{P}_{b,k}) / \tau\big),
        \qquad \ell(b,p) = -w_{b,y}\, w_p \log q[b,y(b,p),p]

    Invalid prototypes are masked out of the softmax (``"mask"``) or held at cosine −1 (``"min_similarity"``).
    ``at="feature"``: ``(B, h, w)``. ``at="label"``: ``(B, H, W)`` when ``per_pixel`` else the equivalent
    ``(B, K, h, w)`` histogram form (same sums, cheaper). ``valid=None``: :func:`validity`. ``pixel_weight``:
    ``(B,)``, ``(B, h, w)`` or ``(B, H, W)``, not differentiated. ``phi`` reuses the features' inverse norms.
    """
    B = features.shape[0]
    K = prototypes.shape[-2]
    h, w = grid = grid_of(features)
    label_size = grid_of(labels)
    labels = labels.long()
    valid = validity(prototypes, valid).expand(B, K)
    with no_autocast(features):
        f = compute_features(features, prototypes)
        z = cosine(f, prototypes.to(f.dtype), s.eps, phi) / s.temperature  # b k n
        z = rearrange(z, "b k (h w) -> b k h w", h=h, w=w)
        if s.absent == "mask":
            # a finite "minus infinity": exp underflows to exactly 0, and an image with no valid prototype at all
            # still gives finite values (its pixels do not contribute), so no NaN reaches the gradients.
            fill = torch.full_like(z, torch.finfo(z.dtype).min)
        else:
            fill = torch.full_like(z, -1.0 / s.temperature)
        logp = torch.log_softmax(torch.where(valid[:, :, None, None], z, fill), dim=1)
        cw = class_weights(valid, None if class_weight is None else class_weight.expand(B, K), s.absent, logp.dtype)
        if s.at == "feature":
            y = resize_labels(labels, grid, s.resize, K, s.ignore_index, s.min_purity)
            pw = _pixel_weight_at(pixel_weight, grid, label_size, torch.float32, logp.dtype)
            return _terms_at_grid(logp, y, cw, pw, s.ignore_index)
        if per_pixel:
            rule = upsample_rule(label_size, labels.device, logp.dtype)
            pw = _pixel_weight_at(pixel_weight, label_size, grid, rule, logp.dtype)
            return _terms_at_label_pixels(logp, labels, cw, pw, s.ignore_index)
        pw = None
        if pixel_weight is not None:
            pw = pixel_weight.detach().to(logp.dtype)
            if pw.ndim == 1:
                pw = pw[:, None, None, None]
            elif tuple(pw.shape[-2:]) == grid and grid != label_size:
                pw = pw[:, None]  # b 1 h w: scales each cell's histogram
        return _terms_by_histogram(logp, labels, cw, pw, s.ignore_index)


def presence(labels: Tensor, size: Tuple[int, int], num_classes: int, ignore_index: int) -> Tensor:
    """``(B, K)`` bool: class k occurs in image b's labels nearest-resized to ``size``."""
    y = resize_labels(labels.long(), size, "nearest", num_classes, ignore_index)
    classes = torch.arange(num_classes, device=labels.device)
    y = rearrange(y, "b h w -> b 1 (h w)")
    return ((y == classes[None, :, None]) & (y != ignore_index)).any(-1)  # b k
