r"""Dynamic-label gates of the adaptation study (the ``gated``, ``agreement`` and ``either`` variants).

Not part of the reference pipeline: the study plugs a gate into the pipeline's step through its documented hook,
``train_gta2cs.adapt_step(run, src, tgt, target_labels=target_labels_hook(rule, K))``. What trains on what:
the orchestrator builds the hybrid labels y_T and computes FCL/BCL (and its EMA updates) on the **ungated** y_T;
the gate then chooses, from the orchestrator's output, the labels of the target cross-entropy only. The
``hybrid`` diagnostics of a gated run describe the gated labels (what the CE trained on). No rule helps on every
shift (docs/examples.md).

All gates run on the device without a host read.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from protocl import IGNORE_INDEX

RULES = ("prediction", "agreement", "either")


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


def target_labels_hook(rule: str, num_classes: int) -> Callable:
    """``target_labels(out, static, target_logits)`` for :func:`train_gta2cs.adapt_step`: the gated labels of
    the target CE under ``rule`` (one of :data:`RULES`)."""
    if rule not in RULES:
        raise ValueError(f"expected rule in {RULES}, got {rule!r}")

    def target_labels(out, static: Tensor, target_logits: Tensor) -> Tensor:
        if rule == "prediction":
            return gate_dynamic(static, out.target_labels, target_logits.argmax(1))
        prediction = target_logits.argmax(1) if rule == "either" else None
        return gate_by_agreement(static, out.dynamic_labels, out.target_labels, num_classes, prediction=prediction)

    return target_labels
