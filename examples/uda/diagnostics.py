r"""Per-class diagnostics of pseudo labels against ground truth (``--diagnostics``; the adaptation study).

A diagnostic only: the pipeline never trains on target ground truth. One implementation for the pipeline and
``benchmarks/study``: :func:`class_counts` counts on the device (no host read, so it can run inside a training
step), :func:`summarize` turns summed counts into percentages.

Class-mean rule (the same everywhere): a class's value is NaN where it is undefined (coverage and recall: the
class is absent from the ground truth; precision: nothing was labelled with the class where the ground truth is
known); the class mean is the plain mean over the classes whose value is defined, and NaN when none is. A class
that is labelled but never in the ground truth has precision 0 and counts in the precision mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from protocl import IGNORE_INDEX

COUNT_NAMES = ("gt", "covered", "labelled", "correct")  # rows of class_counts
LABEL_KINDS = ("static", "dynamic", "hybrid")


def class_counts(labels: Tensor, gt: Tensor, num_classes: int) -> Tensor:
    r"""Per-class agreement counts of pseudo ``labels`` with ground truth ``gt`` (same shape), ``(4, K)`` int64:

    - ``gt[k]``: pixels of class k in the ground truth;
    - ``covered[k]``: of those, the pixels that carry a pseudo label (of any class);
    - ``labelled[k]``: pixels labelled k where the ground truth is known;
    - ``correct[k]``: pixels labelled k whose ground truth is k.

    One ``scatter_add_`` into a device tensor: no ``bincount`` (whose output size needs a host read on CUDA).
    """
    K = num_classes
    known, has_label = gt != IGNORE_INDEX, labels != IGNORE_INDEX
    index = torch.stack([
        torch.where(known, gt, K),  # gt
        torch.where(known & has_label, gt, K),  # covered
        torch.where(known & has_label, labels, K),  # labelled
        torch.where(known & (labels == gt), gt, K),  # correct
    ]).flatten(1)  # 4 N
    index = index + torch.arange(4, device=index.device)[:, None] * (K + 1)
    counts = torch.zeros(4 * (K + 1), dtype=torch.int64, device=labels.device)
    counts.scatter_add_(0, index.flatten(), torch.ones_like(index.flatten()))
    return counts.view(4, K + 1)[:, :K]


def class_mean(values: Sequence[float]) -> float:
    """Mean over the defined (non-NaN) values; NaN when none is defined."""
    defined = [v for v in values if not math.isnan(v)]
    return sum(defined) / len(defined) if defined else math.nan


def summarize(counts: Tensor) -> dict:
    """Per-class coverage / precision / recall (percent, NaN where undefined), their class means (see the module
    docstring) and the pixel-level values from :func:`class_counts` sums ``(4, K)``; ``counts`` keeps the sums."""
    gt, covered, labelled, correct = (c.double() for c in counts.cpu())

    def ratio(num: Tensor, den: Tensor) -> list[float]:
        return [100.0 * float(n / d) if d > 0 else math.nan for n, d in zip(num, den)]

    def pixel(num: Tensor, den: Tensor) -> float:
        return 100.0 * float(num.sum() / den.sum()) if den.sum() > 0 else math.nan

    coverage, precision, recall = ratio(covered, gt), ratio(correct, labelled), ratio(correct, gt)
    return {
        "coverage": coverage, "precision": precision, "recall": recall,
        "class_mean_coverage": class_mean(coverage), "class_mean_precision": class_mean(precision),
        "class_mean_recall": class_mean(recall),
        "pixel_coverage": pixel(covered, gt), "pixel_precision": pixel(correct, labelled),
        "counts": {name: [int(v) for v in row] for name, row in zip(COUNT_NAMES, counts.cpu())},
    }


def pct(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0f}"


def table(entry: dict[str, dict], class_names: Sequence[str]) -> str:
    """A Markdown table of coverage / precision per class for each label kind of ``entry`` (kind -> summary);
    classes neither in the ground truth nor labelled are left out."""
    kinds = list(entry)
    lines = ["| class | " + " | ".join(f"{n} cov / prec" for n in kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for k, name in enumerate(class_names):
        if entry[kinds[0]]["counts"]["gt"][k] or any(entry[n]["counts"]["labelled"][k] for n in kinds):
            cells = [f"{pct(entry[n]['coverage'][k])} / {pct(entry[n]['precision'][k])}" for n in kinds]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **class mean** | " + " | ".join(
        f"**{pct(entry[n]['class_mean_coverage'])} / {pct(entry[n]['class_mean_precision'])}**" for n in kinds) + " |")
    lines.append("| pixels | " + " | ".join(
        f"{pct(entry[n]['pixel_coverage'])} / {pct(entry[n]['pixel_precision'])}" for n in kinds) + " |")
    return "\n".join(lines)
