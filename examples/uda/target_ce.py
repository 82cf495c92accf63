r"""Which labels the target cross-entropy trains on: ``--target-ce`` (issue 20's candidate fixes, as options).

The orchestrator (:class:`protocl.BidirectionalContrast`) builds the hybrid labels y_T = fuse(y_F, y_D) and
computes FCL/BCL (and moves its EMAs) on them; these rules choose, from its output and the step's prototype
cosines, the labels of the **target CE only** (FCL/BCL keep the orchestrator's y_T):

- ``hybrid`` (default, the paper's): y_T itself.
- ``margin``: y_T where a static label exists; a dynamic fill-in only where its feature cell's best prototype
  cosine beats the second best by at least ``--target-ce-margin`` (the cell's margin, nearest-upsampled like the
  labels); else ignored.
- ``hires``: hybrid labels whose dynamic part is decided at label resolution: the cosines are upsampled
  bilinearly (the logits' rule) to (H, W) before the arg max and the threshold, instead of deciding on the
  feature grid and upsampling label blocks (thin and diagonal structures come out as staircases otherwise).
- ``hires_margin``: ``hires`` with the margin rule taken at label resolution.

None of them is the default: on the adaptation study (docs/examples.md, "Issue 20") none met the rule for a new
default on every shift. ``margin`` was at or above the paper default on all five shifts; ``hires_margin`` came
closest to the same-budget control on the shape-defined shift. All run on the device without a host read; none
holds state, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from protocl import IGNORE_INDEX, hybrid_fuse

RULES = ("hybrid", "margin", "hires", "hires_margin")
MARGIN = 0.05  # chosen before any study run from a short demo run's margins (thin classes ~0.03)


def margin_map(cosine: Tensor) -> Tensor:
    """Best minus second-best cosine per cell ``(B, h, w)`` of a cosine map ``Tensor[B, K, h, w]`` (``-inf``: no
    prototype; a missing second prototype counts as −1; a cell without any prototype gets 0)."""
    top = cosine.topk(min(2, cosine.shape[1]), dim=1).values
    second = top[:, 1].clamp_min(-1.0) if top.shape[1] > 1 else torch.full_like(top[:, 0], -1.0)
    return torch.nan_to_num(top[:, 0] - second, nan=0.0, posinf=0.0, neginf=0.0)


def gate_by_margin(static: Tensor, hybrid: Tensor, sims, margin: float = MARGIN) -> Tensor:
    """Rule ``margin``: keep the hybrid label ``Tensor[B, H, W]`` where a static label exists, and a dynamic
    fill-in only where its feature cell's margin (:func:`margin_map` of ``sims.cosine``, nearest-upsampled to
    (H, W) like the labels) is at least ``margin``; else ``IGNORE_INDEX``."""
    m = F.interpolate(margin_map(sims.cosine)[:, None], size=static.shape[-2:], mode="nearest")[:, 0]
    keep = (static != IGNORE_INDEX) | (m >= margin)
    return torch.where(keep, hybrid, torch.full_like(hybrid, IGNORE_INDEX))


def label_resolution_dynamic(sims, static: Tensor, threshold: float, fuse: str = "fill", margin: float | None = None
                             ) -> tuple[Tensor, Tensor]:
    """Rule ``hires``: dynamic labels decided at the static labels' resolution. The step's prototype cosines
    (``sims``: :class:`uda.signals.Similarities`, on the feature grid) are upsampled bilinearly to (H, W)
    before the arg max and the threshold (``best > threshold``, the orchestrator's rule), then fused with the
    static labels (``fuse``, the pipeline's ``--fuse``). Returns ``(y_D, y_T)``, both ``Tensor[B, H, W]``.

    With ``margin`` (rule ``hires_margin``) a pixel also needs its best upsampled cosine to beat the second best
    (−1 where there is none) by at least ``margin``."""
    cosine = torch.where(sims.valid[:, :, None, None], sims.cosine, torch.full_like(sims.cosine, -2.0))
    up = F.interpolate(cosine, size=static.shape[-2:], mode="bilinear", align_corners=False)
    up = torch.where(sims.valid[:, :, None, None], up, torch.full_like(up, -math.inf))
    best, arg = up.max(dim=1)
    keep = best > threshold
    if margin is not None:
        keep = keep & (margin_map(up) >= margin)
    dynamic = torch.where(keep, arg, torch.full_like(arg, IGNORE_INDEX))
    return dynamic, hybrid_fuse(static, dynamic, mode=fuse)


def hook(rule: str, *, threshold: float, margin: float = MARGIN, fuse: str = "fill") -> Callable | None:
    """The ``target_labels(out, static, target_logits, sims)`` hook of :func:`train_gta2cs.adapt_step` for
    ``rule`` (one of :data:`RULES`); None for ``hybrid`` (the orchestrator's y_T, no hook)."""
    if rule not in RULES:
        raise ValueError(f"expected rule in {RULES}, got {rule!r}")
    if not 0.0 <= margin <= 2.0:
        raise ValueError(f"expected margin in [0, 2] (a cosine difference), got {margin!r}")
    if rule == "hybrid":
        return None

    def target_labels(out, static: Tensor, target_logits: Tensor, sims=None) -> Tensor:
        if sims is None:
            raise ValueError(f"expected the step's prototype cosines for rule {rule!r}, got sims=None")
        if rule == "margin":
            return gate_by_margin(static, out.target_labels, sims, margin)
        return label_resolution_dynamic(sims, static, threshold, fuse,
                                        margin=margin if rule == "hires_margin" else None)[1]

    return target_labels
