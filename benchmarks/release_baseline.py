r"""Loop-based baseline that follows the authors' release procedure (the protocl method spec, §6).

This file is a benchmark baseline, not part of the library. It is written from the description of the release in
the protocl method spec (§6 "Release compatibility"), not copied from any public code, and it keeps the release's
*procedure* on purpose, because that procedure is what the benchmark measures:

- a Python loop over the (source image, target image) pairs of the batch;
- per pair, label maps nearest-resized to the feature grid with ``F.interpolate``;
- per pair and per class, a Python loop over ``torch.unique(labels)`` (a device-to-host sync) that pools the
  prototype of each present class with a boolean mask; absent classes stay zero vectors;
- cosine between normalised prototypes and normalised pixel features; every cosine exactly 0 is replaced by -1
  (which is how an absent, all-zero prototype gets cosine -1); logits = cosine / temperature (x10);
- the (K, h, w) logits nearest-upsampled to the label resolution with ``F.interpolate``, then
  ``F.cross_entropy`` at full label resolution with ``ignore_index=255``;
- FCL: target pixels against source prototypes, class weight 1 for the classes present in both resized label
  maps (found with two more ``torch.unique`` calls), 0 otherwise; BCL: source pixels against target prototypes,
  no class weight;
- the batch loss is the mean over the pairs of ``fcl_weight * FCL + bcl_weight * BCL``.

:func:`release_losses` is that loss. :class:`ReleaseStep` wraps it into a whole adaptation step in the same loop
style, following the order of spec §3 (source prototypes, calibration by the EMA domain bias, dynamic labels,
"fill" fusion, target prototypes, losses, EMA updates with per-class Python branches), so that the benchmark can
compare a whole protocl step with a whole loop-style step. §6 fixes only the loss; the extra step parts use the
same per-class loop idiom and follow the §3 formulas.

The numerical contract (tested in ``tests/test_bench_smoke.py``): on random inputs :func:`release_losses` equals
protocl's release-compatible loss (``absent="min_similarity"``, ``at="label"``, per-image prototypes, overlap
class weight) to fp32 rounding. Known differences from protocl by design: the release normalises with
``F.normalize`` (eps 1e-12 on the norm) where protocl clamps norms at 1e-6, and the release's mean over an empty
set of pixels is NaN where protocl's is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255


def resize_labels_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    r"""Nearest-resize one label map the way the release does it (through a float ``F.interpolate``).

    Args:
        labels: label map of shape :math:`(H, W)`, int64.
        size: the output size ``(h, w)``.

    Returns:
        The resized label map of shape :math:`(h, w)`, int64.
    """
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    resized = F.interpolate(labels[None, None].float(), size=size, mode="nearest")
    return resized[0, 0].long()


def release_prototypes(
    features: Tensor, labels: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    r"""Per-image class prototypes with a per-class Python loop over ``torch.unique`` (one host sync).

    Args:
        features: pixel features of one image, shape :math:`(D, h, w)`.
        labels: its labels already resized to the feature grid, shape :math:`(h, w)`, int64.
        num_classes: K.
        ignore_index: label that takes part in no prototype.

    Returns:
        Prototypes of shape :math:`(K, D)`; the row of a class absent from ``labels`` is zero.
    """
    prototypes = features.new_zeros(num_classes, features.shape[0])
    for k in torch.unique(labels).tolist():  # host sync, as in the release
        if k == ignore_index:
            continue
        mask = labels == k  # (h, w) bool
        prototypes[k] = features[:, mask].mean(dim=1)  # boolean-mask gather: d h w -> d n -> d
    return prototypes


def release_overlap_weight(
    source_labels: Tensor, target_labels: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    r"""FCL class weight: 1 for the classes present in both (already resized) label maps, else 0.

    Args:
        source_labels: source labels on the feature grid, shape :math:`(h, w)`.
        target_labels: target labels on the feature grid, shape :math:`(h, w)`.
        num_classes: K.
        ignore_index: label ignored when listing classes.

    Returns:
        Class weight of shape :math:`(K,)`, float32.
    """
    weight = torch.zeros(num_classes, device=source_labels.device)
    source_classes = set(torch.unique(source_labels).tolist())  # host sync
    for k in torch.unique(target_labels).tolist():  # host sync
        if k != ignore_index and k in source_classes:
            weight[k] = 1.0
    return weight


def release_logits(features: Tensor, prototypes: Tensor, *, temperature: float = 0.1) -> Tensor:
    r"""Cosine logits of one image against K prototypes, with the release's "cosine exactly 0 -> -1" rule.

    .. math::
        z_{k,p} = \frac{1}{\tau}\,\begin{cases} -1 & \text{if } \cos(f_p, P_k) = 0 \\
        \cos(f_p, P_k) & \text{otherwise}\end{cases}

    Args:
        features: shape :math:`(D, h, w)`.
        prototypes: shape :math:`(K, D)`.
        temperature: :math:`\tau`.

    Returns:
        Logits of shape :math:`(K, h, w)`.
    """
    features = F.normalize(features, dim=0)
    prototypes = F.normalize(prototypes, dim=1)
    cosine = torch.einsum("kd,dhw->khw", prototypes, features)
    cosine = cosine.masked_fill(cosine == 0, -1.0)
    return cosine / temperature


def release_pair_ce(
    features: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    class_weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    r"""Cross-entropy of one image at label resolution against nearest-upsampled cosine logits.

    Args:
        features: shape :math:`(D, h, w)`.
        prototypes: shape :math:`(K, D)`.
        labels: full-resolution labels, shape :math:`(H, W)`.
        temperature: logit temperature.
        class_weight: optional :math:`(K,)` weight passed to ``F.cross_entropy``.
        ignore_index: label that does not contribute.

    Returns:
        Scalar loss (NaN when no pixel contributes, as in ``F.cross_entropy``).
    """
    logits = release_logits(features, prototypes, temperature=temperature)
    logits = F.interpolate(logits[None], size=tuple(labels.shape[-2:]), mode="nearest")  # 1 K H W
    return F.cross_entropy(logits, labels[None], weight=class_weight, ignore_index=ignore_index)


class ReleaseLosses(NamedTuple):
    r"""Batch loss and its two parts (means over the pairs)."""

    loss: Tensor
    fcl: Tensor
    bcl: Tensor


def release_losses(
    source_features: Tensor,
    source_labels: Tensor,
    target_features: Tensor,
    target_labels: Tensor,
    num_classes: int,
    *,
    fcl_weight: float = 0.1,
    bcl_weight: float = 0.1,
    temperature: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
) -> ReleaseLosses:
    r"""FCL + BCL as the release computes them: loops over pairs and classes (spec §6).

    .. math::
        L = \frac{1}{B} \sum_{b} \lambda_F\,\mathrm{FCL}_b + \lambda_B\,\mathrm{BCL}_b

    Args:
        source_features: shape :math:`(B, D, h, w)`.
        source_labels: shape :math:`(B, H, W)`, int64.
        target_features: shape :math:`(B, D, h, w)`.
        target_labels: (pseudo) labels, shape :math:`(B, H, W)`, int64.
        num_classes: K.
        fcl_weight: :math:`\lambda_F`.
        bcl_weight: :math:`\lambda_B`.
        temperature: logit temperature (the release uses 0.1, i.e. x10).
        ignore_index: label that does not contribute.

    Returns:
        :class:`ReleaseLosses` ``(loss, fcl, bcl)``, each a scalar.
    """
    fcl_terms, bcl_terms = [], []
    for b in range(source_features.shape[0]):
        fcl, bcl = release_pair_losses(
            source_features[b], source_labels[b], target_features[b], target_labels[b], num_classes,
            temperature=temperature, ignore_index=ignore_index,
        )
        fcl_terms.append(fcl)
        bcl_terms.append(bcl)
    fcl = torch.stack(fcl_terms).mean()
    bcl = torch.stack(bcl_terms).mean()
    return ReleaseLosses(fcl_weight * fcl + bcl_weight * bcl, fcl, bcl)


def release_pair_losses(
    source_features: Tensor,
    source_labels: Tensor,
    target_features: Tensor,
    target_labels: Tensor,
    num_classes: int,
    *,
    temperature: float = 0.1,
    ignore_index: int = IGNORE_INDEX,
    source_prototypes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""FCL and BCL of one (source image, target image) pair.

    Args:
        source_features: shape :math:`(D, h, w)`.
        source_labels: shape :math:`(H, W)`, int64.
        target_features: shape :math:`(D, h, w)`.
        target_labels: shape :math:`(H, W)`, int64.
        num_classes: K.
        temperature: logit temperature.
        ignore_index: label that does not contribute.
        source_prototypes: the pair's source prototypes :math:`(K, D)` when the caller already pooled them.

    Returns:
        ``(fcl, bcl)`` scalars.
    """
    feature_size = tuple(source_features.shape[-2:])
    source_small = resize_labels_nearest(source_labels, feature_size)
    target_small = resize_labels_nearest(target_labels, feature_size)
    if source_prototypes is None:
        source_prototypes = release_prototypes(source_features, source_small, num_classes, ignore_index=ignore_index)
    target_prototypes = release_prototypes(target_features, target_small, num_classes, ignore_index=ignore_index)
    weight = release_overlap_weight(source_small, target_small, num_classes, ignore_index=ignore_index)
    weight = weight.to(target_features.dtype)
    fcl = release_pair_ce(
        target_features, source_prototypes, target_labels,
        temperature=temperature, class_weight=weight, ignore_index=ignore_index,
    )
    bcl = release_pair_ce(
        source_features, target_prototypes, source_labels, temperature=temperature, ignore_index=ignore_index
    )
    return fcl, bcl


class ReleaseStepOutput(NamedTuple):
    r"""What one loop-style step returns (mirrors the fields of protocl's ``StepOutput`` that it computes)."""

    loss: Tensor
    fcl: Tensor
    bcl: Tensor
    target_labels: Tensor


class ReleaseStep(nn.Module):
    r"""A whole adaptation step in the release's loop style (spec §3 order, §6 loss).

    Per pair: source prototypes (class loop), calibration by the EMA domain bias (class loop), dynamic labels
    (cosine to the calibrated source prototypes of the classes present, threshold), "fill" fusion with the static
    labels at label resolution, then :func:`release_losses` on the hybrid labels and EMA updates of batch-pooled
    prototypes with per-class Python branches.

    Args:
        num_classes: K.
        dim: D.
        fcl_weight: :math:`\lambda_F`.
        bcl_weight: :math:`\lambda_B`.
        temperature: logit temperature.
        momentum: EMA momentum.
        threshold: dynamic-label cosine threshold.
        ignore_index: ignore label.

    Shape:
        - source_features, target_features: :math:`(B, D, h, w)`
        - source_labels, static_labels: :math:`(B, H, W)` int64
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        fcl_weight: float = 0.1,
        bcl_weight: float = 0.1,
        temperature: float = 0.1,
        momentum: float = 0.999,
        threshold: float = 0.7,
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.fcl_weight = fcl_weight
        self.bcl_weight = bcl_weight
        self.temperature = temperature
        self.momentum = momentum
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.register_buffer("source_ema", torch.zeros(num_classes, dim))
        self.register_buffer("target_ema", torch.zeros(num_classes, dim))
        self.register_buffer("source_init", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("target_init", torch.zeros(num_classes, dtype=torch.bool))

    def _dynamic_labels(self, target_features: Tensor, source_protos: Tensor, present: list[int]) -> Tensor:
        # calibrate the present classes' prototypes with the EMA bias, class by class (host reads of the flags)
        calibrated = source_protos.detach().clone()
        for k in present:
            if bool(self.source_init[k]) and bool(self.target_init[k]):
                calibrated[k] = calibrated[k] + self.target_ema[k] - self.source_ema[k]
        cosine = torch.einsum(
            "kd,dhw->khw", F.normalize(calibrated, dim=1), F.normalize(target_features.detach(), dim=0)
        )
        absent = torch.ones(self.num_classes, dtype=torch.bool, device=cosine.device)
        absent[present] = False
        cosine = cosine.masked_fill(absent[:, None, None], float("-inf"))
        best, labels = cosine.max(dim=0)
        return torch.where(best > self.threshold, labels, torch.full_like(labels, self.ignore_index))

    @torch.no_grad()
    def _ema_update(self, ema: Tensor, init: Tensor, features: Tensor, labels_small: Tensor) -> None:
        # batch-pooled prototypes, then a per-class Python branch (host sync per class)
        feats = features.permute(1, 0, 2, 3).reshape(features.shape[1], -1)  # b d h w -> d (b h w)
        flat = labels_small.reshape(-1)
        for k in torch.unique(flat).tolist():
            if k == self.ignore_index:
                continue
            mean = feats[:, flat == k].mean(dim=1)
            if bool(init[k]):
                ema[k] = self.momentum * ema[k] + (1 - self.momentum) * mean
            else:
                ema[k] = mean
                init[k] = True

    def forward(
        self, source_features: Tensor, source_labels: Tensor, target_features: Tensor, static_labels: Tensor
    ) -> ReleaseStepOutput:
        r"""Run one step; returns the loss parts and the hybrid target labels at label resolution."""
        feature_size = tuple(source_features.shape[-2:])
        label_size = tuple(static_labels.shape[-2:])
        hybrid, source_small_all, target_small_all, fcl_terms, bcl_terms = [], [], [], [], []
        for b in range(source_features.shape[0]):
            source_small = resize_labels_nearest(source_labels[b], feature_size)
            source_protos = release_prototypes(
                source_features[b], source_small, self.num_classes, ignore_index=self.ignore_index
            )
            present = [k for k in torch.unique(source_small).tolist() if k != self.ignore_index]
            dynamic = self._dynamic_labels(target_features[b], source_protos, present)
            dynamic = resize_labels_nearest(dynamic, label_size)
            fused = torch.where(static_labels[b] != self.ignore_index, static_labels[b], dynamic)
            fcl, bcl = release_pair_losses(
                source_features[b], source_labels[b], target_features[b], fused, self.num_classes,
                temperature=self.temperature, ignore_index=self.ignore_index, source_prototypes=source_protos,
            )
            fcl_terms.append(fcl)
            bcl_terms.append(bcl)
            hybrid.append(fused)
            source_small_all.append(source_small)
            target_small_all.append(resize_labels_nearest(fused, feature_size))
        fcl = torch.stack(fcl_terms).mean()
        bcl = torch.stack(bcl_terms).mean()
        loss = self.fcl_weight * fcl + self.bcl_weight * bcl
        self._ema_update(self.source_ema, self.source_init, source_features.detach(), torch.stack(source_small_all))
        self._ema_update(self.target_ema, self.target_init, target_features.detach(), torch.stack(target_small_all))
        return ReleaseStepOutput(loss, fcl, bcl, torch.stack(hybrid))
