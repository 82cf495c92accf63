r"""Dynamic-label gates of the adaptation study (the ``gated``, ``agreement`` and ``either`` variants of issue 11;
``hires``, ``margin`` and ``class_off``, the candidate fixes of issue 20).

Not part of the reference pipeline: the study plugs a gate into the pipeline's step through its documented hook,
``train_gta2cs.adapt_step(run, src, tgt, target_labels=target_labels_hook(rule, K))``. What trains on what:
the orchestrator builds the hybrid labels y_T and computes FCL/BCL (and its EMA updates) on the **ungated** y_T;
the gate then chooses, from the orchestrator's output, the labels of the target cross-entropy only. The
``hybrid`` diagnostics of a gated run describe the gated labels (what the CE trained on). No rule helps on every
shift (docs/examples.md). Rule ``hires`` replaces the CE's labels by hybrid labels whose dynamic part is decided at
label resolution (FCL/BCL keep the orchestrator's, decided on the feature grid: protocl's orchestrator has no
option for it). ``hires``, ``margin`` and ``hires_margin`` live in the pipeline as ``--target-ce``
(:mod:`uda.target_ce`); this module adds the study-only rules around them.

All gates run on the device without a host read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from uda.target_ce import MARGIN, gate_by_margin, label_resolution_dynamic, margin_map  # noqa: F401 (re-exported)
from torch import Tensor

from protocl import IGNORE_INDEX

RULES = ("prediction", "agreement", "either", "hires", "margin", "class_off", "hires_margin")  # the last four: issue 20
CLASS_OFF_MIN_AGREEMENT = 0.5  # rule "class_off"
CLASS_OFF_MOMENTUM = 0.98  # rule "class_off": memory of its running counts (about 50 steps)


def gate_dynamic(static: Tensor, hybrid: Tensor, prediction: Tensor) -> Tensor:
    """Rule ``prediction``: keep the hybrid label where a static label exists, and elsewhere (a label the dynamic
    branch filled in) only where it equals the classifier's own prediction; else ignore."""
    keep = (static != IGNORE_INDEX) | (hybrid == prediction)
    return torch.where(keep, hybrid, torch.full_like(hybrid, IGNORE_INDEX))


def gate_by_agreement(static: Tensor, dynamic: Tensor, hybrid: Tensor, num_classes: int,
                      min_agreement: float = 0.5, prediction: Tensor | None = None) -> Tensor:
    """Rule ``agreement``: keep a dynamic fill-in of class c only if, in this batch, the dynamic labels of class c
    agree with the static labels on at least ``min_agreement`` of the pixels that carry both.

    A label-free estimate of each class's dynamic-label precision: static labels are the precise ones (most
    classes 90-100 %), so where both exist their agreement measures how often a dynamic c is right. A class
    whose dynamic labels never meet a static label keeps them (no evidence against). Static labels are always
    kept. With ``prediction`` (rule ``either``), a dynamic fill-in that equals the classifier's argmax is kept as
    well. Per-class counts with ``scatter_add_`` on the device: no host sync.
    """
    K = num_classes
    has_static, has_dynamic = static != IGNORE_INDEX, dynamic != IGNORE_INDEX
    column = torch.where(has_static & has_dynamic, dynamic, K).flatten()  # class K: not counted
    overlap = torch.zeros(K + 1, device=dynamic.device).scatter_add_(0, column, torch.ones_like(column,
                                                                                                dtype=torch.float))
    agree = torch.zeros(K + 1, device=dynamic.device).scatter_add_(0, column, (static == dynamic).flatten().float())
    reliable = agree >= min_agreement * overlap  # K + 1 flags; True where no overlap (0 >= 0)
    keep = has_static | reliable[torch.where(has_dynamic, dynamic, K)]
    if prediction is not None:
        keep = keep | (hybrid == prediction)
    return torch.where(keep, hybrid, torch.full_like(hybrid, IGNORE_INDEX))


class ClassOff:
    """Rule ``class_off``: switch a class's dynamic fill-ins off (for the target CE) while its **running**
    dynamic/static agreement (the label-free signal ``static_agreement`` of :mod:`uda.signals`, over the recent
    steps: counts decayed by ``momentum`` per step) is below ``min_agreement``. A class without overlap so far
    keeps them. Its counts are device tensors: no host read."""

    def __init__(self, num_classes: int, min_agreement: float = CLASS_OFF_MIN_AGREEMENT,
                 momentum: float = CLASS_OFF_MOMENTUM) -> None:
        self.K, self.min_agreement, self.momentum = num_classes, min_agreement, momentum
        self.overlap = self.agree = None

    def __call__(self, static: Tensor, dynamic: Tensor, hybrid: Tensor) -> Tensor:
        K = self.K
        has_static, has_dynamic = static != IGNORE_INDEX, dynamic != IGNORE_INDEX
        column = torch.where(has_static & has_dynamic, dynamic, K).flatten()
        overlap = torch.zeros(K + 1, dtype=torch.float64, device=dynamic.device).scatter_add_(
            0, column, torch.ones_like(column, dtype=torch.float64))
        agree = torch.zeros(K + 1, dtype=torch.float64, device=dynamic.device).scatter_add_(
            0, column, (static == dynamic).flatten().double())
        if self.overlap is None:
            self.overlap, self.agree = overlap, agree
        else:
            self.overlap = self.momentum * self.overlap + overlap
            self.agree = self.momentum * self.agree + agree
        reliable = self.agree >= self.min_agreement * self.overlap  # True where no overlap (0 >= 0); K: unused
        keep = has_static | reliable[torch.where(has_dynamic, dynamic, K)]
        return torch.where(keep, hybrid, torch.full_like(hybrid, IGNORE_INDEX))


def target_labels_hook(rule: str, num_classes: int, threshold: float | None = None) -> Callable:
    """``target_labels(out, static, target_logits, sims)`` for :func:`train_gta2cs.adapt_step`: the gated labels of
    the target CE under ``rule`` (one of :data:`RULES`)."""
    if rule not in RULES:
        raise ValueError(f"expected rule in {RULES}, got {rule!r}")

    if rule in ("hires", "hires_margin") and threshold is None:
        raise ValueError(f"expected the dynamic-label threshold for rule {rule!r}, got threshold=None")
    class_off = ClassOff(num_classes) if rule == "class_off" else None

    def target_labels(out, static: Tensor, target_logits: Tensor, sims=None) -> Tensor:
        if rule in ("hires", "margin", "hires_margin") and sims is None:
            raise ValueError(f"expected the step's prototype cosines for rule {rule!r}, got sims=None")
        if rule == "hires":
            return label_resolution_dynamic(sims, static, threshold)[1]
        if rule == "hires_margin":
            return label_resolution_dynamic(sims, static, threshold, margin=MARGIN)[1]
        if rule == "margin":
            return gate_by_margin(static, out.target_labels, sims)
        if rule == "class_off":
            return class_off(static, out.dynamic_labels, out.target_labels)
        if rule == "prediction":
            return gate_dynamic(static, out.target_labels, target_logits.argmax(1))
        prediction = target_logits.argmax(1) if rule == "either" else None
        return gate_by_agreement(static, out.dynamic_labels, out.target_labels, num_classes, prediction=prediction)

    return target_labels
