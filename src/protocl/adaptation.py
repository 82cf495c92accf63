r"""The orchestrator: one call per training step of bi-directional contrastive adaptation.

:class:`BidirectionalContrast` runs the method's step (the protocl method spec, §3 "Orchestrator") in order:

1. :math:`p_S` ← MAP(:math:`f_S, y_S`) per image;
2. :math:`p_{S\to T}` ← calibrate(:math:`p_S, \mu_S, \mu_T`) with the EMAs of earlier steps;
3. :math:`y_D` ← dynamic_pseudo_label(:math:`f_T, p_{S\to T}`);
4. :math:`y_T` ← hybrid_fuse(:math:`y_F, y_D`);
5. :math:`p_T` ← MAP(:math:`f_T, y_T`);
6. loss = :math:`\lambda_{FCL}` fcl(:math:`f_T, p_S, y_T`) + :math:`\lambda_{BCL}` bcl(:math:`f_S, p_T, y_S`);
7. :math:`\mu_S` ← EMA(:math:`p_S`), :math:`\mu_T` ← EMA(:math:`p_T`) (detached).
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from ._kernels import contrastive as contrast_kernels
from ._kernels import prototypes as prototype_kernels
from ._kernels import pseudo_labels as label_kernels
from ._kernels.cosine import compute_features, feature_inverse_norm
from ._kernels.reduction import pair_mean, reduce_loss
from ._kernels.resize import grid_of
from ._types import FUSE_MODES, IGNORE_INDEX, MIN_PURITY, MOMENTUM, TEMPERATURE, THRESHOLD, Absent, At, FuseMode, ResizeMode
from ._validation import (
    check_bool,
    check_channels,
    check_choice,
    check_features_labels,
    check_int,
    check_label_values,
    check_pixel_weights,
    check_range,
    check_real,
    check_same_device,
    class_weight_vector,
    report_pending,
)
from .contrastive import contrast_settings
from .prototypes import PrototypeEMA

__all__ = ["BidirectionalContrast", "StepOutput", "PrototypeSimilarities"]

FN = "BidirectionalContrast.forward"  # the function that value-check messages name


class PrototypeSimilarities(NamedTuple):
    r"""The cosines behind one step's dynamic labels :math:`y_D` (``BidirectionalContrast(...,
    return_similarities=True)``, then ``StepOutput.similarities``); all detached.

    - ``cosine``: cosine of every target feature cell with the paired image's calibrated source prototypes
      (step 2's :math:`p_{S\to T}`), ``-inf`` where that source image has no prototype of the class; fp32 (fp64
      for fp64 features). :math:`y_D` is its arg max over classes where the maximum exceeds ``threshold``.
    - ``prototypes``: those per-image source prototypes (calibrated when ``calibrate=True``, as pooled otherwise),
      taken with the EMAs as they were before this step's update.
    - ``valid``: whether source image b has class k (``counts > 0``).

    Shape:
        - cosine: :math:`(B, K, h, w)` on the target feature grid
        - prototypes: :math:`(B, K, D)`
        - valid: :math:`(B, K)` bool

    Example:
        >>> step = BidirectionalContrast(num_classes=3, dim=4)
        >>> y_s = torch.tensor([0, 1]).repeat_interleave(8).view(1, 4, 4)  # class 2 absent from the source image
        >>> f_s, f_t, y_f = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), torch.zeros(1, 4, 4, dtype=torch.long)
        >>> out = step(f_s, y_s, f_t, y_f, return_similarities=True)
        >>> sims = out.similarities
        >>> sims.valid.tolist(), bool((sims.cosine[0, 2] == float("-inf")).all()), tuple(sims.cosine.shape)
        ([[True, True, False]], True, (1, 3, 2, 2))
    """

    cosine: Tensor
    prototypes: Tensor
    valid: Tensor


class _StepFields(NamedTuple):
    loss: Tensor
    fcl: Tensor
    bcl: Tensor
    target_labels: Tensor
    dynamic_labels: Tensor
    stats: Dict[str, Tensor]


class StepOutput(_StepFields):
    r"""What :class:`BidirectionalContrast` returns for one step: a named tuple of six fields,
    ``loss, fcl, bcl, target_labels, dynamic_labels, stats = out``.

    - ``loss``: :math:`\lambda_{FCL}` FCL + :math:`\lambda_{BCL}` BCL, a scalar in the graph.
    - ``fcl``, ``bcl``: the two unweighted terms (in the graph).
    - ``target_labels``: hybrid labels :math:`y_T` ``(B, H, W)`` at the static labels' size: use them for the
      target cross-entropy.
    - ``dynamic_labels``: :math:`y_D` ``(B, H, W)`` at the static labels' size (all ignore when dynamic labels
      are off).
    - ``stats``: detached scalar tensors (coverages, agreement, class counts); no host sync.

    One attribute besides the six fields (not part of the tuple, so unpacking and ``len`` are unchanged):

    - ``similarities``: a :class:`PrototypeSimilarities` when the step was called with
      ``return_similarities=True``, else None. ``_replace`` and ``_make`` do not carry it.
    """

    similarities: Optional[PrototypeSimilarities] = None

    def __new__(
        cls,
        loss: Tensor,
        fcl: Tensor,
        bcl: Tensor,
        target_labels: Tensor,
        dynamic_labels: Tensor,
        stats: Dict[str, Tensor],
        similarities: Optional[PrototypeSimilarities] = None,
    ) -> "StepOutput":
        self = super().__new__(cls, loss, fcl, bcl, target_labels, dynamic_labels, stats)
        if similarities is not None:
            self.similarities = similarities
        return self


class BidirectionalContrast(nn.Module):
    r"""One training step of bi-directional prototype contrast (FCL + BCL) with hybrid target labels.

    Holds the hyper-parameters and two :class:`~protocl.PrototypeEMA` (``source_ema``, ``target_ema``); its
    ``forward`` runs the seven steps of the module docstring and returns a :class:`StepOutput`:

    .. math::
        \mathcal{L} = \lambda_{FCL}\, \ell(f_T, p_S, y_T) + \lambda_{BCL}\, \ell(f_S, p_T, y_S)

    with :math:`\ell` = :func:`~protocl.pixel_prototype_contrastive_loss`, :math:`p_S, p_T` per-image prototypes,
    :math:`y_T` = hybrid_fuse(:math:`y_F`, dynamic labels of :math:`f_T` against calibrated :math:`p_S`).

    ``release_compatible=True`` reproduces the authors' loss numbers (the protocl method spec, §6): absent
    prototypes at cosine −1 (``absent="min_similarity"``), loss at label resolution (``at="label"``), the class
    weight :func:`~protocl.overlap_class_weight` (1 for the classes present in both resized label maps of the
    pair, 0 otherwise) on **both** FCL and BCL — the release passes both terms through one
    ``CrossEntropyLoss(weight=overlap)`` — and the batch loss as the mean over (source, target) pairs of each
    pair's loss. It overrides ``absent`` and ``at``. Where the release gives NaN (a pair with no class in the
    overlap, e.g. an all-ignored label map), that pair's terms are 0 with zero gradients here, and the pair still
    counts in the mean over pairs.

    Args:
        num_classes: K.
        dim: D, channels of the contrast features.
        fcl_weight: :math:`\lambda_{FCL}` (paper grid {0.1, 0.3, 0.5, 0.7}).
        bcl_weight: :math:`\lambda_{BCL}`.
        temperature: :math:`\tau` of both losses.
        momentum: EMA momentum :math:`\lambda` of both prototype EMAs.
        threshold: cosine threshold of the dynamic labels.
        fuse: ``"fill"`` | ``"agree"`` | ``"dynamic_first"`` (:func:`~protocl.hybrid_fuse`).
        absent: ``"mask"`` | ``"min_similarity"`` (see the loss).
        at: ``"feature"`` | ``"label"`` (see the loss).
        calibrate: shift source prototypes by the EMA domain bias before the dynamic labels (step 2).
        dynamic: compute dynamic labels and fuse them (steps 2-4); False uses the static labels as :math:`y_T`.
        ignore_index: the ignore label.
        resize: label resize to the feature grid for pooling and ``at="feature"``: ``"nearest"`` | ``"purity"``.
        min_purity: for ``resize="purity"``, the share of a cell's pixels its majority class needs.
        sync: synchronise the EMAs across ranks when ``torch.distributed`` is initialised.
        release_compatible: the authors' loss settings (above).
        detach_prototypes: stop gradients into the prototypes of the loss (they flow by default, as in the
            release).

    **When the EMAs update** (step 7) follows BatchNorm's running statistics: in training mode (``.train()``,
    the default) every forward updates them, in evaluation mode (``.eval()``) none does, whatever the grad mode
    (``torch.no_grad()`` alone does not stop them, as it does not stop BatchNorm's). ``forward(..., update=True)``
    or ``update=False`` overrides the mode for one call.

    **Weights** (``forward`` keywords, none by default): ``target_weight`` weights the target pixels of FCL and
    ``source_weight`` the source pixels of BCL (``(B, H, W)`` label grid, ``(B, h, w)`` feature grid or ``(B,)``
    per image; e.g. DAFormer's ``pseudo_weight``), exactly as ``pixel_weight`` of
    :func:`~protocl.pixel_prototype_contrastive_loss`: "mean" divides by the summed weights of the contributing
    pixels. ``class_weight`` ``(K,)`` or ``(B, K)`` weights both terms by class (with ``release_compatible``, it
    multiplies the overlap weight). The weights enter the losses only, not the prototypes or the EMAs.

    **The cosines behind the dynamic labels** (``forward(..., return_similarities=True)``): the output's
    ``similarities`` attribute (a :class:`PrototypeSimilarities`, None by default) hands out the cosine map of the
    target features to the calibrated per-image source prototypes that :math:`y_D` is the thresholded arg max of,
    those prototypes and their validity: detached, computed before step 7 moves the EMAs, and without a host
    sync, for a trainer's label-free signals or target-CE rules that would otherwise recompute them. It costs
    nothing when not asked (the tensors exist inside the step anyway); with ``dynamic=False`` they are computed for
    the request alone (one cosine map more). The six fields of :class:`StepOutput` are unchanged.

    Shape:
        - source_features, target_features: :math:`(B, D, h, w)` (the two grids may differ)
        - source_labels, static_labels: :math:`(B, H, W)` or mmseg's :math:`(B, 1, H, W)`, int64 (sizes may
          differ); the returned label maps are :math:`(B, H, W)`
        - source_weight, target_weight: :math:`(B, H, W)`, :math:`(B, h, w)` or :math:`(B,)` of their domain
        - class_weight: :math:`(K,)` or :math:`(B, K)`
        - ``out.similarities``: ``cosine`` :math:`(B, K, h, w)` on the target grid, ``prototypes``
          :math:`(B, K, D)`, ``valid`` :math:`(B, K)`

    Example:
        >>> step = BidirectionalContrast(num_classes=4, dim=8)
        >>> f_s = torch.randn(2, 8, 6, 6, requires_grad=True); f_t = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> y_s = torch.randint(0, 4, (2, 24, 24)); y_f = torch.randint(0, 4, (2, 24, 24))
        >>> out = step(f_s, y_s, f_t, y_f)
        >>> out.loss.backward()
        >>> out.target_labels.shape, bool(step.source_ema.initialized.all())
        (torch.Size([2, 24, 24]), True)
        >>> loss, fcl, bcl, target_labels, dynamic_labels, stats = out  # six fields
        >>> out.similarities is None
        True
        >>> out = step(f_s, y_s, f_t, y_f, return_similarities=True)
        >>> sims = out.similarities
        >>> sims.cosine.shape, sims.prototypes.shape, sims.valid.shape, sims.cosine.requires_grad
        (torch.Size([2, 4, 6, 6]), torch.Size([2, 4, 8]), torch.Size([2, 4]), False)
        >>> best, arg = sims.cosine.max(dim=1)  # y_D on the feature grid: the arg max above the threshold
        >>> y_d = torch.where(best > step.threshold, arg, 255)
        >>> from protocl import resize_labels
        >>> bool((resize_labels(y_d, (24, 24)) == out.dynamic_labels).all())
        True
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        fcl_weight: float = 0.1,
        bcl_weight: float = 0.1,
        temperature: float = TEMPERATURE,
        momentum: float = MOMENTUM,
        threshold: float = THRESHOLD,
        fuse: FuseMode = "fill",
        absent: Absent = "mask",
        at: At = "feature",
        calibrate: bool = True,
        dynamic: bool = True,
        ignore_index: int = IGNORE_INDEX,
        resize: ResizeMode = "nearest",
        min_purity: float = MIN_PURITY,
        sync: bool = True,
        release_compatible: bool = False,
        detach_prototypes: bool = False,
    ) -> None:
        super().__init__()
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.dim = check_int(dim, "dim", 1)
        self.fcl_weight = check_real(fcl_weight, "fcl_weight")
        self.bcl_weight = check_real(bcl_weight, "bcl_weight")
        for name, value in (("fcl_weight", self.fcl_weight), ("bcl_weight", self.bcl_weight)):
            if value < 0:
                raise ValueError(f"{name}: expected a weight >= 0, got {value}")
        self.threshold = check_range(threshold, "threshold", -1.0, 1.0)
        self.fuse = check_choice(fuse, "fuse", FUSE_MODES)
        self.calibrate = check_bool(calibrate, "calibrate")
        self.dynamic = check_bool(dynamic, "dynamic")
        self.release_compatible = check_bool(release_compatible, "release_compatible")
        self.detach_prototypes = check_bool(detach_prototypes, "detach_prototypes")
        check_bool(sync, "sync")
        if release_compatible:
            absent, at = "min_similarity", "label"
        # the loss settings (validated: temperature, absent, at, ignore_index, resize, min_purity)
        self.settings = contrast_settings(
            temperature=temperature, absent=absent, at=at, ignore_index=ignore_index, resize=resize,
            min_purity=min_purity,
        )
        self.source_ema = PrototypeEMA(self.num_classes, self.dim, momentum, sync=sync)
        self.target_ema = PrototypeEMA(self.num_classes, self.dim, momentum, sync=sync)

    @property
    def ignore_index(self) -> int:
        return self.settings.ignore_index

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, dim={self.dim}, fcl_weight={self.fcl_weight}, "
            f"bcl_weight={self.bcl_weight}, temperature={self.settings.temperature}, threshold={self.threshold}, "
            f"fuse={self.fuse!r}, absent={self.settings.absent!r}, at={self.settings.at!r}, "
            f"calibrate={self.calibrate}, "
            f"dynamic={self.dynamic}, release_compatible={self.release_compatible}"
        )

    # ------------------------------------------------------------------------------------------- pieces

    def _pool(self, features: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        s = self.settings
        sums, counts = prototype_kernels.class_sums(
            features, labels, self.num_classes, ignore_index=s.ignore_index, weights=None, resize=s.resize,
            min_purity=s.min_purity,
        )
        return prototype_kernels.divide_counts(sums, counts), counts

    def _contrast(
        self, features: Tensor, prototypes: Tensor, labels: Tensor, valid: Tensor, class_weight: Optional[Tensor],
        phi: Optional[Tensor] = None, pixel_weight: Optional[Tensor] = None,
    ) -> Tensor:
        loss, weight = contrast_kernels.contrastive_terms(
            features, prototypes, labels, valid, class_weight, self.settings, phi=phi, pixel_weight=pixel_weight
        )
        # the release: the mean over (source, target) pairs of each pair's weighted mean; an empty pair counts 0
        return pair_mean(loss, weight) if self.release_compatible else reduce_loss(loss, "mean", weight)

    def calibrated(self, source_prototypes: Tensor) -> Tensor:
        """Step 2: source prototypes shifted by the current EMA domain bias (no gradient into the EMAs)."""
        report_pending()
        return self._calibrated(source_prototypes)

    def _calibrated(self, source_prototypes: Tensor) -> Tensor:
        ema_s, ema_t = self.source_ema, self.target_ema
        return prototype_kernels.calibrate(
            source_prototypes, ema_s.prototypes, ema_t.prototypes, ema_s.initialized, ema_t.initialized
        )

    # ------------------------------------------------------------------------------------------- step

    def forward(
        self,
        source_features: Tensor,
        source_labels: Tensor,
        target_features: Tensor,
        static_labels: Tensor,
        *,
        update: Optional[bool] = None,
        source_weight: Optional[Tensor] = None,
        target_weight: Optional[Tensor] = None,
        class_weight: Optional[Tensor] = None,
        return_similarities: bool = False,
    ) -> StepOutput:
        """Run one step. ``update``: whether step 7 updates the EMAs; None (default) follows ``self.training``
        (BatchNorm's rule: ``.eval()`` freezes them), ``True``/``False`` overrides it for this call. The weights:
        see the class docstring. ``return_similarities=True``: the output's ``similarities`` holds the cosines
        behind :math:`y_D` (:class:`PrototypeSimilarities`; see the class docstring)."""
        report_pending()
        source_labels = check_features_labels(source_features, source_labels, "source_features", "source_labels")
        static_labels = check_features_labels(target_features, static_labels, "target_features", "static_labels")
        check_same_device("source_features", source_features, "target_features", target_features)
        check_channels(source_features, self.dim, "source_features", "the dim of this module")
        check_channels(target_features, self.dim, "target_features", "the dim of this module")
        if target_features.shape[0] != source_features.shape[0]:
            raise ValueError(
                f"target_features: expected batch size {source_features.shape[0]} (one target image per source "
                f"image), got shape {tuple(target_features.shape)}"
            )
        if update is None:
            update = self.training
        check_bool(update, "update")
        check_bool(return_similarities, "return_similarities")
        class_weight = class_weight_vector(class_weight, self.num_classes, source_features, "source_features")
        if source_weight is not None:
            source_weight = check_pixel_weights(
                source_weight, source_features, source_labels, "source_weight", FN, per_image=True
            )
        if target_weight is not None:
            target_weight = check_pixel_weights(
                target_weight, target_features, static_labels, "target_weight", FN, per_image=True
            )
        K, s = self.num_classes, self.settings
        ignore = s.ignore_index
        check_label_values(source_labels, K, ignore, "source_labels", FN)
        check_label_values(static_labels, K, ignore, "static_labels", FN)
        y_s, y_f = source_labels.long(), static_labels.long()

        p_s, n_s = self._pool(source_features, y_s)  # 1
        valid_s = n_s > 0
        # the target features' inverse norms, shared by the dynamic labels and FCL (one pass over them less)
        phi_t = feature_inverse_norm(compute_features(target_features, p_s), s.eps) if self.dynamic else None
        similarities, cosine = None, None
        if self.dynamic or return_similarities:  # (with dynamic labels off, computed for the request alone)
            anchors = p_s.detach()
            if self.calibrate:
                anchors = self._calibrated(anchors)  # 2
            cosine = label_kernels.prototype_cosine(target_features, anchors, valid_s, s.eps, phi_t)  # (B, K, hw)
            if return_similarities:
                grid_t = grid_of(target_features)
                similarities = PrototypeSimilarities(cosine.unflatten(2, grid_t), anchors, valid_s)
        if self.dynamic and cosine is not None:
            y_d = label_kernels.labels_from_cosine(
                cosine, grid_of(target_features), self.threshold, ignore, grid_of(y_f)
            )  # 3
            y_t = label_kernels.fuse(y_f, y_d, self.fuse, ignore)  # 4
        else:
            y_d = torch.full_like(y_f, ignore)
            y_t = y_f
        p_t, n_t = self._pool(target_features, y_t)  # 5
        valid_t = n_t > 0

        weight = class_weight
        if self.release_compatible:  # one class weight for both terms, as the release's single CrossEntropyLoss
            grid_s, grid_t = grid_of(source_features), grid_of(target_features)
            both = contrast_kernels.presence(y_s, grid_s, K, ignore) & contrast_kernels.presence(y_t, grid_t, K, ignore)
            weight = both.to(p_s.dtype) if class_weight is None else both.to(p_s.dtype) * class_weight.to(p_s.dtype)
        proto_s = p_s.detach() if self.detach_prototypes else p_s
        proto_t = p_t.detach() if self.detach_prototypes else p_t
        fcl = self._contrast(target_features, proto_s, y_t, valid_s, weight, phi_t, target_weight)  # 6
        bcl = self._contrast(source_features, proto_t, y_s, valid_t, weight, None, source_weight)
        loss = self.fcl_weight * fcl + self.bcl_weight * bcl

        if update:  # 7
            self.source_ema._update_sums(*prototype_kernels.batch_sums(p_s, n_s))  # (validated here already)
            self.target_ema._update_sums(*prototype_kernels.batch_sums(p_t, n_t))
        stats = _statistics(y_f, y_d, y_t, valid_s, valid_t, fcl, bcl, ignore)
        return StepOutput(loss, fcl, bcl, y_t, y_d, stats, similarities)


def _statistics(
    y_f: Tensor, y_d: Tensor, y_t: Tensor, valid_s: Tensor, valid_t: Tensor, fcl: Tensor, bcl: Tensor, ignore: int
) -> Dict[str, Tensor]:
    """Detached step statistics; counts with ``count_nonzero`` (no int64 copies of the label maps)."""
    labelled_f, labelled_d = y_f != ignore, y_d != ignore
    both = labelled_f & labelled_d
    n = float(y_f.numel())
    n_both = torch.count_nonzero(both)
    agree = torch.count_nonzero(both & (y_f == y_d))
    return {
        "fcl": fcl.detach(),
        "bcl": bcl.detach(),
        "static_coverage": torch.count_nonzero(labelled_f) / n,
        "dynamic_coverage": torch.count_nonzero(labelled_d) / n,
        "hybrid_coverage": torch.count_nonzero(y_t != ignore) / n,
        "dynamic_static_agreement": agree / n_both.clamp_min(1),
        "source_classes": valid_s.sum(-1, dtype=torch.float32).mean(),
        "target_classes": valid_t.sum(-1, dtype=torch.float32).mean(),
    }
