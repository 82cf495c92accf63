r"""Evaluation: confusion matrix over K classes, per-class IoU and mIoU (sharded across ranks).

Logits are computed at the evaluation input size and bilinearly upsampled to the label's full resolution
(Cityscapes: 2048×1024), as in the spec's reference pipeline.

SYNTHIA → Cityscapes is evaluated over the 16 classes the two datasets share (the network still predicts 19):
:func:`iou_over_classes` computes each of the 16 IoUs from the 19×19 confusion matrix as the 16-class protocol
does, ground-truth pixels of the other 3 classes ignored and predictions of them counted as misses;
``miou16`` and ``miou13`` are the plain means of those IoUs over the 16 and over 13 of them (without wall,
fence, pole), never a ×19/16 rescaling of a 19-class mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from protocl import IGNORE_INDEX
from protocl.distributed import all_reduce_sum_


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
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


def iou_over_classes(confusion: Tensor, classes: Sequence[int]) -> list[float]:
    r"""Per-class IoU (percent) of a K-class confusion matrix evaluated over the subset ``classes`` only.

    Ground-truth pixels of classes outside ``classes`` are ignored (as if labelled ignore); a prediction of a
    class outside ``classes`` on a kept pixel is a miss of its ground-truth class. For c in ``classes``:

    .. math::
        \mathrm{IoU}_c = \frac{C_{cc}}{\sum_{j} C_{cj} + \sum_{i \in S, i \ne c} C_{ic}}

    with rows = ground truth, S = ``classes``. Returns one value per entry of ``classes`` (NaN where the
    union is empty).
    """
    kept = torch.zeros(confusion.shape[0], dtype=torch.bool)
    kept[list(classes)] = True
    confusion = confusion.double().cpu() * kept[:, None]  # rows (ground truth) outside the subset -> ignored
    tp = confusion.diag()
    union = confusion.sum(1) + confusion.sum(0) - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))
    return [100.0 * iou[c].item() for c in classes]


def mean_iou(iou: Sequence[float]) -> float:
    """Mean over the classes with a defined IoU (present in the ground truth or predicted)."""
    values = [v for v in iou if not math.isnan(v)]
    return sum(values) / max(1, len(values))


def summarize(confusion: Tensor, subsets: dict[str, Sequence[int]] | None = None) -> dict:
    """``{"miou", "iou"}`` of a K×K confusion matrix.

    With ``subsets`` (e.g. ``{"16": [...], "13": [...]}``), the first subset is the evaluation protocol: its
    classes' IoUs come from :func:`iou_over_classes`; every subset ``name`` then gets ``iou<name>`` (those IoUs,
    one per class of the subset) and ``miou<name>`` (their plain mean); the later subsets must lie inside the
    first (mIoU13 is the mean of 13 of the 16-class protocol's IoUs, as the benchmark reports it). ``miou`` is
    the first subset's mean (the headline figure), ``iou`` lists K values, NaN outside the first subset, and
    ``miou19``/``iou19`` keep the plain K-class values.
    """
    iou = iou_from_confusion(confusion.cpu())
    if not subsets:
        return {"miou": mean_iou(iou), "iou": iou}
    names = list(subsets)
    protocol = list(subsets[names[0]])
    by_class = dict(zip(protocol, iou_over_classes(confusion, protocol)))
    result = {"miou19": mean_iou(iou), "iou19": iou}
    for name in names:
        outside = set(subsets[name]) - set(protocol)
        if outside:
            raise ValueError(f"expected subset {name!r} inside subset {names[0]!r}, got classes {sorted(outside)}")
        values = [by_class[c] for c in subsets[name]]
        result[f"miou{name}"], result[f"iou{name}"] = mean_iou(values), values
    result["miou"] = result[f"miou{names[0]}"]
    result["iou"] = [by_class.get(c, math.nan) for c in range(len(iou))]
    return result


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, *,
             subsets: dict[str, Sequence[int]] | None = None, amp_dtype: torch.dtype | None = None) -> dict:
    """Run ``model`` over ``loader`` (this rank's shard) and return :func:`summarize` over all ranks.

    ``amp_dtype`` runs the network under autocast (the argmax is taken on fp32 logits)."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    for batch in loader:
        images = batch["image"].to(device, non_blocking=True)
        label = batch["label"].to(device, non_blocking=True).long()
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits, _ = model(images)
        logits = F.interpolate(logits.float(), size=label.shape[-2:], mode="bilinear", align_corners=False)
        confusion += confusion_matrix(logits.argmax(1), label, num_classes)
    all_reduce_sum_(confusion)
    model.train(was_training)
    return summarize(confusion, subsets)


def iou_table(columns: dict[str, Sequence[float]], class_names: Sequence[str]) -> str:
    """A Markdown table of per-class IoU; ``columns`` maps column titles to per-class IoU lists (percent)."""
    head = "| class | " + " | ".join(columns) + " |"
    lines = [head, "|---|" + "---:|" * len(columns)]
    for k, name in enumerate(class_names):
        cells = ["n/a" if math.isnan(col[k]) else f"{col[k]:.2f}" for col in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **mIoU** | " + " | ".join(f"**{mean_iou(col):.2f}**" for col in columns.values()) + " |")
    return "\n".join(lines)
