r"""Per-class reliability inside the step, and ProDA-style rectification (issue 27, item 3; all opt-in).

``--reliability-weight``
    :func:`class_weights`: each class's reliability is its dynamic/static agreement so far in the round (the
    label-free signal ``static_agreement`` of :mod:`uda.signals`, from the round's running sums
    ``state["signal_counts"]``), smoothed as ``(agree + 1) / (overlap + 1)`` so that a class without evidence
    weighs 1. The step hands it to the orchestrator as ``class_weight`` (FCL and BCL) and weighs the target CE
    pixel by pixel by the reliability of its label's class (:func:`safe_cross_entropy`, the pipeline's CE).
``--fallback drop-flagged``
    :func:`flagged_weights`: weight 0 for the classes the undone round's signals flag (dynamic/static agreement
    below 50 %, the log's flag), 1 for the others, through the same two paths.
``--rectify``
    :func:`prototype_weights` and :func:`rectify`: ProDA's soft rectification (Zhang et al., CVPR 2021, Eq. 4-5)
    of the static labels' probabilities. The round's static labels are thresholded arg maxes of the round's start
    model; its probabilities p (``Run.teacher``, a frozen copy taken at the round's start) are weighted per class by
    ω_k = softmax_k(cos(f, η_k) / τ) over the target EMA prototypes η_k (τ = ``--temperature``; cosine where ProDA
    takes −‖f − η_k‖, as every prototype distance of this pipeline is a cosine), and the label is the arg max of
    ω ⊙ p. It replaces the static label where one exists and the dynamic label elsewhere where the rectified
    probability (ω ⊙ p normalised) reaches ``--threshold``; the orchestrator then trains FCL/BCL and its EMAs on
    these labels (built with ``dynamic=False``).

All of it runs on the device without a host read. The weights come from the round's sums, which the checkpoint
holds (summed over ranks: one ``all_reduce`` per step under torch.distributed keeps every rank, and a resumed
run, on the same weights); the teacher is in the checkpoint too.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import protocl
from protocl import IGNORE_INDEX
from protocl.distributed import all_reduce_sum_

from .signals import FLAG_BELOW, ROWS

__all__ = ["class_weights", "flagged_weights", "safe_cross_entropy", "prototype_weights", "rectify",
           "new_teacher", "set_teacher"]

_OVERLAP, _AGREE = ROWS.index("overlap"), ROWS.index("agree")


def class_weights(counts: Tensor, world: int = 1) -> Tensor:
    """Reliability per class ``(K,)`` float32 in (0, 1] from the round's signal sums ``counts`` (``(len(ROWS),
    K)``, :func:`uda.signals.step_counts` added up): ``(agree + 1) / (overlap + 1)``, summed over ranks first
    when ``world > 1``."""
    if counts.ndim != 2 or counts.shape[0] != len(ROWS):
        raise ValueError(f"counts: expected shape ({len(ROWS)}, K) (uda.signals.ROWS), got {tuple(counts.shape)}")
    if world > 1:
        counts = all_reduce_sum_(counts.clone())
    return ((counts[_AGREE] + 1) / (counts[_OVERLAP] + 1)).float()


def flagged_weights(agreement: list, device: torch.device | str | None = None, below: float = FLAG_BELOW) -> Tensor:
    """``(K,)`` float32: 0 for a class whose ``static_agreement`` (a round's signal, NaN/None: no evidence) is
    below ``below``, 1 otherwise."""
    flags = [v is not None and not math.isnan(v) and v < below for v in agreement]
    return torch.tensor([0.0 if f else 1.0 for f in flags], device=device)


def safe_cross_entropy(logits: Tensor, labels: Tensor, class_weight: Tensor | None = None) -> Tensor:
    """The pipeline's cross-entropy of ``logits`` ``(B, K, H, W)`` against ``labels`` ``(B, H, W)``: the mean over
    non-ignored pixels; with ``class_weight`` ``(K,)`` each pixel weighs its label's class weight and the mean
    divides by the summed weights (torch's ``weight`` rule). 0, in the graph, when no pixel carries weight (never
    NaN)."""
    if class_weight is None:
        total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        return total / (labels != IGNORE_INDEX).sum().clamp_min(1)
    valid = labels != IGNORE_INDEX
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="none")
    weight = torch.where(valid, class_weight.to(ce.dtype)[torch.where(valid, labels, 0)], 0.0)
    return (ce * weight).sum() / weight.sum().clamp_min(1e-6)


def prototype_weights(features: Tensor, prototypes: Tensor, initialized: Tensor, temperature: float) -> Tensor:
    r"""ω of every feature cell ``(B, K, h, w)``: softmax over the initialised classes of
    :math:`\cos(f, \eta_k) / \tau`; 0 for a class without a prototype; uniform where no class has one."""
    if features.ndim != 4 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(f"features, prototypes: expected (B, D, h, w) and (K, D), got {tuple(features.shape)} "
                         f"and {tuple(prototypes.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    logits = protocl.cosine_similarity_map(features.float(), prototypes.float()) / temperature  # b k h w
    init = initialized.bool()[None, :, None, None]
    logits = torch.where(init, logits, torch.full_like(logits, -math.inf))
    weights = torch.softmax(logits, dim=1)
    uniform = torch.full_like(weights, 1.0 / weights.shape[1])
    return torch.where(init.any(), torch.nan_to_num(weights, nan=0.0), uniform)


def rectify(probabilities: Tensor, weights: Tensor, static: Tensor, threshold: float) -> Tensor:
    """Rectified labels ``(B, H, W)``: the arg max of ``weights`` (``(B, K, h, w)``, upsampled bilinearly to the
    labels' size) times ``probabilities`` ``(B, K, H, W)``, kept where ``static`` has a label or the normalised
    rectified probability reaches ``threshold``; else ``IGNORE_INDEX``."""
    size = static.shape[-2:]
    if probabilities.shape[-2:] != size or probabilities.shape[:2] != weights.shape[:2]:
        raise ValueError(f"probabilities, weights, static: expected (B, K, H, W), (B, K, h, w), (B, H, W), got "
                         f"{tuple(probabilities.shape)}, {tuple(weights.shape)}, {tuple(static.shape)}")
    if tuple(weights.shape[-2:]) != tuple(size):
        weights = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
    q = weights * probabilities.float()
    q = q / q.sum(1, keepdim=True).clamp_min(1e-12)
    best, label = q.max(dim=1)
    keep = (static != IGNORE_INDEX) | (best >= threshold)
    return torch.where(keep, label, torch.full_like(label, IGNORE_INDEX))


def new_teacher(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` in evaluation mode (``--rectify``: the round's static-label model)."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@torch.no_grad()
def set_teacher(teacher: nn.Module, model: nn.Module) -> None:
    """The teacher takes ``model``'s current weights (at a round's start, before its static labels)."""
    teacher.load_state_dict(model.state_dict())
