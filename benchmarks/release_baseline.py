r"""The authors' release, re-implemented line by line: the oracle of protocl's release-compatible setting.

Source: cvlab-yonsei/DASS, ``trainer/damnet_trainer.py`` (commit 4e945b9), ``Trainer.metric_loss`` (lines 39-112)
and the pair averaging of ``Trainer.iter`` (lines 126-147). :func:`release_metric_loss` follows ``metric_loss``
statement by statement; each statement carries the line number it comes from (``# L41``). It is written from
the release's code, not from protocl or from the protocl method spec, so that a misreading of the release in
either cannot be copied here. Deviations, all of them mechanical:

- ``.cuda()`` becomes "the features' device", and the prototype buffers (L54, L93, float32 in the release) take
  the features' dtype, so that the oracle also runs in float64 (for gradient checks to 1e-9);
- ``Tensor.resize`` (deprecated) becomes ``reshape``: the tensors are contiguous, so both are the same view;
- the hard-coded 19 classes become ``num_classes``, the hard-coded two pairs of ``iter`` become the batch;
- lines 73-91 (a dynamic-label draft: ``target_predicted``, ``label_t_resize_new``, ``overlap_classes2``) compute
  values that no later line reads, and are left out; line 106 (``prototype_loss2``, an unweighted
  ``CrossEntropyLoss``) defines a loss object that is never called, and is left out too;
- nothing else: the cosine map is upsampled by ``F.interpolate`` itself (L63, L103) in the features' dtype, so
  in float64 it reads the rows ``F.interpolate`` picks for float64 (on CPU these differ from float32's at some
  sizes, e.g. row 365 of 92 -> 730; protocl follows ``F.interpolate`` in each dtype, see ``protocl.resize``).

What the release computes (and protocl's ``release_compatible=True`` reproduces): both FCL (L108) and BCL (L109)
go through the same ``CrossEntropyLoss(weight=overlap)`` (L71), so source pixels of classes that are not present
in both resized label maps get weight 0 in BCL too. Where a pair has no overlap class (or a label map is all
ignore) ``F.cross_entropy`` divides 0 by 0: the release's pair loss and its gradients are NaN.

``benchmarks/bench.py`` times :func:`release_losses` against protocl (the release's loops, as they run).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255
RELEASE = "cvlab-yonsei/DASS trainer/damnet_trainer.py @ 4e945b9"


class PairLoss(NamedTuple):
    r"""One pair's terms: ``metric_loss1`` (FCL, L108), ``metric_loss2`` (BCL, L109) and their weighted sum."""

    loss: Tensor
    fcl: Tensor
    bcl: Tensor


def release_metric_loss(
    feature_s: Tensor,
    label_s: Tensor,
    feature_t: Tensor,
    label_t: Tensor,
    *,
    num_classes: int = 19,
    lamb_metric1: float = 0.1,
    lamb_metric2: float = 0.1,
) -> PairLoss:
    r"""``Trainer.metric_loss`` of the release for one (source image, target image) pair.

    Args:
        feature_s: source features of shape :math:`(1, D, h_s, w_s)` (``iter`` slices one image, L128).
        label_s: source labels of shape :math:`(1, H_s, W_s)`, int64 (L126).
        feature_t: target features of shape :math:`(1, D, h_t, w_t)` (L133).
        label_t: target (static pseudo) labels of shape :math:`(1, H_t, W_t)`, int64 (L131).
        num_classes: the release's hard-coded 19.
        lamb_metric1: ``config.lamb_metric1``, the FCL weight.
        lamb_metric2: ``config.lamb_metric2``, the BCL weight.

    Returns:
        :class:`PairLoss` of scalars (NaN when no class is in the overlap, as in the release).
    """
    device, dtype = feature_s.device, feature_s.dtype
    _, ch, feature_s_h, feature_s_w = feature_s.size()  # L40
    label_s_resize = F.interpolate(label_s.float().unsqueeze(0), size=(feature_s_h, feature_s_w))  # L41
    _, _, feature_t_h, feature_t_w = feature_t.size()  # L43
    label_t_resize = F.interpolate(label_t.float().unsqueeze(0), size=(feature_t_h, feature_t_w))  # L44

    source_list = torch.unique(label_s_resize.float())  # L46
    target_list = torch.unique(label_t_resize.float())  # L47

    overlap_classes = []  # L49
    for index in torch.unique(label_s_resize):  # L50
        if index in torch.unique(label_t_resize) and index != 255.0:  # L51
            overlap_classes.append(index.detach())  # L52

    source_prototypes = torch.zeros(size=(num_classes, ch), dtype=dtype, device=device)  # L54
    for index in source_list:  # L55
        if index != 255.0:  # L56
            fg_mask_s = ((label_s_resize == index) * 1).detach()  # L57
            prototype_s = (fg_mask_s * feature_s).squeeze().reshape(ch, feature_s_h * feature_s_w).sum(-1) / (
                fg_mask_s.sum()
            )  # L58
            source_prototypes[int(index)] = prototype_s  # L59

    cs_map = torch.matmul(
        F.normalize(source_prototypes, dim=1),
        F.normalize(feature_t.squeeze().reshape(ch, feature_t_h * feature_t_w), dim=0),
    )  # L61
    cs_map[cs_map == 0] = -1  # L62
    cosine_similarity_map = F.interpolate(
        cs_map.reshape(1, num_classes, feature_t_h, feature_t_w), size=label_t.size()[-2:]
    )  # L63
    cosine_similarity_map *= 10  # L64

    cross_entropy_weight = torch.zeros(size=(num_classes, 1), dtype=dtype)  # L66
    for element in overlap_classes:  # L67
        cross_entropy_weight[int(element)] = 1  # L68
    cross_entropy_weight = cross_entropy_weight.to(device)  # L70
    prototype_loss = torch.nn.CrossEntropyLoss(weight=cross_entropy_weight, ignore_index=255)  # L71
    # L73-91: the dynamic-label draft; nothing below reads what it computes.

    target_prototypes = torch.zeros(size=(num_classes, ch), dtype=dtype, device=device)  # L93
    for index in target_list:  # L94
        if index != 255.0:  # L95
            fg_mask_t = ((label_t_resize == index) * 1).detach()  # L97
            prototype_t = (fg_mask_t * feature_t).squeeze().reshape(ch, feature_t_h * feature_t_w).sum(-1) / (
                fg_mask_t.sum()
            )  # L98
            target_prototypes[int(index)] = prototype_t  # L99

    cs_map2 = torch.matmul(
        F.normalize(target_prototypes, dim=1),
        F.normalize(feature_s.squeeze().reshape(ch, feature_s_h * feature_s_w), dim=0),
    )  # L101
    cs_map2[cs_map2 == 0] = -1  # L102
    cosine_similarity_map2 = F.interpolate(
        cs_map2.reshape(1, num_classes, feature_s_h, feature_s_w), size=label_s.size()[-2:]
    )  # L103
    cosine_similarity_map2 *= 10  # L104
    # L106: prototype_loss2 = CrossEntropyLoss(ignore_index=255) is defined but never called.

    metric_loss1 = prototype_loss(cosine_similarity_map, label_t)  # L108
    metric_loss2 = prototype_loss(cosine_similarity_map2, label_s)  # L109
    metric_loss = lamb_metric1 * metric_loss1 + lamb_metric2 * metric_loss2  # L111
    return PairLoss(metric_loss, metric_loss1, metric_loss2)  # L112


class ReleaseLosses(NamedTuple):
    r"""Batch loss and its two parts (means over the pairs), plus every pair's :class:`PairLoss`."""

    loss: Tensor
    fcl: Tensor
    bcl: Tensor
    pairs: list


def release_losses(
    source_features: Tensor,
    source_labels: Tensor,
    target_features: Tensor,
    target_labels: Tensor,
    num_classes: int,
    *,
    fcl_weight: float = 0.1,
    bcl_weight: float = 0.1,
) -> ReleaseLosses:
    r"""The contrastive part of ``Trainer.iter``: ``metric_loss`` of pair b = (source b, target b), averaged.

    .. math::
        L = \frac{1}{B} \sum_{b} \lambda_F\,\mathrm{FCL}_b + \lambda_B\,\mathrm{BCL}_b

    (L126-134 slice the two pairs, L143-144 call ``metric_loss`` on each, L147 averages them.)

    Args:
        source_features: shape :math:`(B, D, h, w)`.
        source_labels: shape :math:`(B, H, W)`, int64.
        target_features: shape :math:`(B, D, h', w')`.
        target_labels: (static pseudo) labels, shape :math:`(B, H', W')`, int64.
        num_classes: K.
        fcl_weight: :math:`\lambda_F` (``config.lamb_metric1``).
        bcl_weight: :math:`\lambda_B` (``config.lamb_metric2``).

    Returns:
        :class:`ReleaseLosses` ``(loss, fcl, bcl, pairs)``; NaN wherever a pair is NaN, as in the release.
    """
    pairs = [
        release_metric_loss(
            source_features[b : b + 1], source_labels[b : b + 1], target_features[b : b + 1],
            target_labels[b : b + 1], num_classes=num_classes, lamb_metric1=fcl_weight, lamb_metric2=bcl_weight,
        )
        for b in range(source_features.shape[0])
    ]
    count = len(pairs)
    return ReleaseLosses(
        sum(p.loss for p in pairs) / count, sum(p.fcl for p in pairs) / count, sum(p.bcl for p in pairs) / count,
        pairs,
    )


def release_logits(features: Tensor, prototypes: Tensor, *, temperature: float = 0.1) -> Tensor:
    r"""Cosine logits of one image against K prototypes with the release's "cosine exactly 0 -> -1" (L61-L64).

    Args:
        features: shape :math:`(D, h, w)`.
        prototypes: shape :math:`(K, D)`.
        temperature: :math:`\tau` (the release's x10 is :math:`\tau = 0.1`).

    Returns:
        Logits of shape :math:`(K, h, w)`.
    """
    cosine = torch.einsum("kd,dhw->khw", F.normalize(prototypes, dim=1), F.normalize(features, dim=0))
    return cosine.masked_fill(cosine == 0, -1.0) / temperature


class ReleaseStepOutput(NamedTuple):
    r"""What one loop-style step returns (mirrors the fields of protocl's ``StepOutput`` that it computes)."""

    loss: Tensor
    fcl: Tensor
    bcl: Tensor
    target_labels: Tensor
