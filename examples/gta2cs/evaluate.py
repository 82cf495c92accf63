r"""Evaluation: confusion matrix over K classes, per-class IoU and mIoU (sharded across ranks).

Logits are computed at the evaluation input size and bilinearly upsampled to the label's full resolution
(Cityscapes: 2048×1024), as in the spec's reference pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from . import dist
from .data import IGNORE


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = IGNORE) -> Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ignored pixels are skipped."""
    if pred.shape != target.shape:
        raise ValueError(f"expected pred and target of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    valid = target != ignore_index
    index = torch.where(valid, target * num_classes + pred, num_classes * num_classes)
    counts = torch.bincount(index.flatten(), minlength=num_classes * num_classes + 1)
    return counts[: num_classes * num_classes].reshape(num_classes, num_classes)


def iou_from_confusion(confusion: Tensor) -> list[float]:
    """Per-class IoU in percent; NaN for a class absent from both ground truth and predictions."""
    confusion = confusion.double()
    tp = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    return [100.0 * v for v in iou.tolist()]


def mean_iou(iou: Sequence[float]) -> float:
    """Mean over the classes with a defined IoU (present in the ground truth or predicted)."""
    values = [v for v in iou if not math.isnan(v)]
    return sum(values) / max(1, len(values))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device) -> dict:
    """Run ``model`` over ``loader`` (this rank's shard) and return ``{"miou", "iou"}`` over all ranks."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        logits, _ = model(batch["image"].to(device))
        label = batch["label"].to(device)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), label, num_classes)
    dist.all_reduce_sum(confusion)
    model.train(was_training)
    iou = iou_from_confusion(confusion.cpu())
    return {"miou": mean_iou(iou), "iou": iou}


def iou_table(columns: dict[str, Sequence[float]], class_names: Sequence[str]) -> str:
    """A Markdown table of per-class IoU; ``columns`` maps column titles to per-class IoU lists (percent)."""
    head = "| class | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for k, name in enumerate(class_names):
        cells = ["n/a" if math.isnan(col[k]) else f"{col[k]:.2f}" for col in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{mean_iou(col):.2f}**" for col in columns.values()) + " |")
    return "\n".join(lines)
