r"""Label-free reliability signals of the target labels, per class and round (issue 20; on by default,
``--no-signals`` switches them off).

A user on real data has no target ground truth, so ``--diagnostics`` (the labels' true precision) is not
available to them. These signals read **no target label**: only the static labels y_F, the dynamic labels y_D,
the labels the target CE trains on (``hybrid``), the classifier's prediction and the prototypes. Per class c,
over a round of stage 2 (a class's value is NaN where it is undefined, as in :mod:`uda.diagnostics`):

``static_agreement``
    Of the pixels that carry both a static and a dynamic label, the dynamic label being c: the share whose
    static label is c too. Static labels are the confident ones, so this estimates the precision of dynamic c
    where the two overlap. NaN: dynamic c never met a static label.
``prediction_agreement``
    Of the pixels with dynamic label c: the share where the classifier's own argmax is c.
``hybrid_prediction_agreement``
    The same for the labels the target CE trains on.
``margin``
    The mean, over the feature cells whose dynamic label is c (best cosine above the threshold), of the best minus
    the second-best cosine to the (calibrated, per-image) source prototypes: how clearly the cell's feature picks
    c. A second prototype that does not exist counts as cosine −1.
``inflation``
    Pixels labelled c by the dynamic branch per pixel labelled c by the static one, + 1 (the class-balanced static
    labels cover a fixed share of each class's predicted pixels): a class whose dynamic labels grow far beyond its
    static ones is taking pixels from others; one with dynamic labels and no static label at all gets the count
    of its dynamic pixels. NaN: neither label.
``separation``
    1 − the largest cosine between class c's target EMA prototype and another class's (at the round's end):
    a class whose prototype sits close to another's cannot be told apart by the dynamic labels.

For the first three and ``margin`` higher is more reliable; for ``inflation`` lower. How well each ranks classes
by the true precision of their dynamic labels, on the study's shifts: docs/examples.md (the signal validation
table); how to read them: docs/troubleshooting.md ("Reading the reliability signals on real data").

On the training path nothing here reads the device: :func:`step_counts` returns per-class sums (counted with
one ``scatter_add_`` of three joint label histograms, returned as float64 so a round's counts stay exact), the loop adds them up in ``state["signal_counts"]``,
and :func:`summarize` turns them into values at the log point and at the round's end. The step's prediction is
:func:`prediction` (``argmax`` by ``max``: issue 34, ``benchmarks/signals_cost.py``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

import protocl
from protocl import IGNORE_INDEX

from .diagnostics import class_mean

SIGNALS = ("static_agreement", "prediction_agreement", "hybrid_prediction_agreement", "margin", "inflation",
           "separation")
HIGHER_IS_BETTER = {"static_agreement": True, "prediction_agreement": True, "hybrid_prediction_agreement": True,
                    "margin": True, "inflation": False, "separation": True}
ROWS = ("overlap", "agree", "dynamic", "dynamic_pred", "hybrid", "hybrid_pred", "margin_sum", "cells", "static")
FLAG_BELOW = 0.5  # a class is flagged (log, --fallback drop-flagged) when its dynamic/static agreement is below
SHORT = {"static_agreement": "stat-agr", "prediction_agreement": "pred-agr", "hybrid_prediction_agreement": "hyb-agr",
         "margin": "margin", "inflation": "inflation", "separation": "separation"}


class Similarities(NamedTuple):
    """Cosine of every target feature cell with the step's calibrated source prototypes: the ones behind the
    orchestrator's dynamic labels, taken from its output with :meth:`from_output`."""

    cosine: Tensor  # (B, K, h, w) float32, -inf for the classes without a prototype in the paired source image
    valid: Tensor  # (B, K) bool

    @classmethod
    def from_output(cls, out: protocl.StepOutput) -> Similarities:
        """The step's cosines from the orchestrator's own output (called with ``return_similarities=True``:
        :class:`protocl.PrototypeSimilarities`, detached, taken before its EMA update). No recompute, no host
        read."""
        sims = getattr(out, "similarities", None)
        if sims is None:
            raise ValueError("out: expected the output of protocl.BidirectionalContrast called with "
                             f"return_similarities=True, got {type(out).__name__} without similarities")
        return cls(sims.cosine, sims.valid)


def zeros(num_classes: int, device: torch.device | str | None = None) -> Tensor:
    """The accumulator of :func:`step_counts`: ``(len(ROWS), K)`` float64 zeros."""
    return torch.zeros(len(ROWS), num_classes, dtype=torch.float64, device=device)


def _scatter(index: Tensor, values: Tensor, rows: int, K: int) -> Tensor:
    """Per-row class sums: ``index`` (rows, N) class ids (K = not counted), ``values`` (rows, N) float64."""
    offset = index + torch.arange(rows, device=index.device)[:, None] * (K + 1)
    out = torch.zeros(rows * (K + 1), dtype=torch.float64, device=index.device)
    out.scatter_add_(0, offset.flatten(), values.flatten())
    return out.view(rows, K + 1)[:, :K]


@torch.no_grad()
def prediction(logits: Tensor) -> Tensor:
    """The classifier's prediction ``(B, H, W)`` int64 from its logits ``(B, K, H, W)``: exactly
    ``logits.argmax(1)`` (the first maximal class on ties; a NaN counts as the largest value, so a pixel with one
    gets its first NaN class, as with ``argmax``). Computed as ``max(1).indices``, which follows the same rules
    (torch documents the first maximal index for both; NaN, ±inf, ±0, dtypes and layouts are tested equal on
    the CPU, tests/test_signals_cost.py; on CUDA both reduce with ATen's one ``MaxOps`` comparator) and on the
    CPU is about 5x faster than ``argmax`` over the strided class dimension (issue 34:
    benchmarks/signals_cost.py)."""
    return logits.max(1).indices


@torch.no_grad()
def step_counts(static: Tensor, dynamic: Tensor, hybrid: Tensor, prediction: Tensor, sims: Similarities,
                threshold: float, num_classes: int) -> Tensor:
    """One step's per-class sums ``(len(ROWS), K)`` float64 (rows :data:`ROWS`), from label maps ``(B, H, W)``
    (ids in ``[0, K)`` or ``IGNORE_INDEX``; ``prediction``: the classifier's argmax at the same size,
    :func:`prediction`) and the step's :class:`Similarities`."""
    K, ig = num_classes, IGNORE_INDEX
    K1 = K + 1  # class K: not counted
    P = K1 * K1

    def classes(x: Tensor, out: Tensor | None = None) -> Tensor:  # the ignored id -> K (not counted)
        x = x.long()
        return torch.clamp_max(x, K, out=out) if ig >= K else torch.where(x != ig, x, x.new_full((), K), out=out)

    # the cells: the best class (argmax's rules; a cell with a NaN has best NaN: never above the threshold) and
    # its margin to the second best (topk(2)'s second value: the row without the best's entry, ties kept)
    cos = sims.cosine.float().flatten(2)  # (B, K, hw)
    best, arg = cos.max(1)
    second = (cos.scatter(1, arg[:, None], -math.inf).amax(1).clamp_min(-1.0) if K > 1
              else torch.full_like(best, -1.0))
    cell = torch.where(best > threshold, arg, K).flatten()
    margin = torch.nan_to_num(best - second, nan=0.0, posinf=0.0, neginf=0.0).flatten().double()
    # one int64 scatter: three joint histograms (K+1)x(K+1), (dynamic, static), (dynamic, prediction) and
    # (hybrid, prediction), then the cells per class. No comparison map; the codes are written in place into one
    # index (fewer label-sized temporaries: at DeepLab's 730² these are memory-bound)
    n = dynamic.numel()
    index = torch.empty(3 * n + cell.numel(), dtype=torch.int64, device=cell.device)
    ds, dp, hp = index[:3 * n].view(3, *dynamic.shape)
    classes(dynamic, out=ds).mul_(K1)
    classes(prediction, out=hp)
    torch.add(ds, hp, out=dp).add_(P)
    ds.add_(classes(static))
    hp.add_(classes(hybrid), alpha=K1).add_(2 * P)
    torch.add(cell, 3 * P, out=index[3 * n:])
    hist = torch.zeros(3 * P + K1, dtype=torch.int64, device=index.device)
    hist.scatter_add_(0, index, torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel()))
    margin_sum = torch.zeros(K1, dtype=torch.float64, device=index.device).scatter_add_(0, cell, margin)
    joint = hist[:3 * P].view(3, K1, K1)
    total, diag = joint[:, :K].sum(2), joint.diagonal(0, 1, 2)[:, :K]  # (3, K): row sums, same class
    counts = torch.stack([
        total[0] - joint[0, :K, K],  # overlap: dynamic c where a static label exists
        diag[0],  # agree
        total[0],  # dynamic
        diag[1],  # dynamic_pred
        total[2],  # hybrid
        diag[2],  # hybrid_pred
        hist[3 * P:3 * P + K],  # cells
        joint[0, :, :K].sum(0),  # static (whatever the dynamic label)
    ]).double()
    return torch.cat([counts[:6], margin_sum[None, :K], counts[6:]])  # the order of ROWS


def _ratio(num: Tensor, den: Tensor) -> list[float]:
    return [float(n / d) if d > 0 else math.nan for n, d in zip(num, den)]


def separation(ema: protocl.PrototypeEMA) -> list[float]:
    """1 − max cosine of each class's EMA prototype with another initialised class's (NaN: not initialised)."""
    p = torch.nn.functional.normalize(ema.prototypes.detach().double(), dim=-1)
    init = ema.initialized.detach()
    cos = p @ p.T
    K = cos.shape[0]
    cos = torch.where(init[None, :] & ~torch.eye(K, dtype=torch.bool, device=cos.device), cos,
                      torch.full_like(cos, -1.0))
    nearest = cos.max(dim=1).values.cpu()
    return [1.0 - float(v) if bool(i) and K > 1 else math.nan for v, i in zip(nearest, init.cpu())]


def summarize(counts: Tensor, ema: protocl.PrototypeEMA | None = None) -> dict:
    """Per-class values of :data:`SIGNALS` (NaN where undefined), their class means, the sums (``counts``)."""
    c = dict(zip(ROWS, counts.detach().double().cpu()))
    values = {
        "static_agreement": _ratio(c["agree"], c["overlap"]),
        "prediction_agreement": _ratio(c["dynamic_pred"], c["dynamic"]),
        "hybrid_prediction_agreement": _ratio(c["hybrid_pred"], c["hybrid"]),
        "margin": _ratio(c["margin_sum"], c["cells"]),
        "inflation": [float(d / (st + 1)) if d + st > 0 else math.nan for d, st in zip(c["dynamic"], c["static"])],
        "separation": separation(ema) if ema is not None else [math.nan] * counts.shape[1],
    }
    out = {name: values[name] for name in SIGNALS}
    out.update({f"class_mean_{name}": class_mean(values[name]) for name in SIGNALS})
    out["counts"] = {row: [float(v) for v in c[row]] for row in ROWS}
    return out


def _fmt(value: float, name: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:.2f}" if name in ("margin", "inflation", "separation") else f"{100 * value:.0f}%"


def log_summary(summary: dict, class_names, *, low: float = FLAG_BELOW) -> str:
    """The log point's short form: class means and the classes whose dynamic labels agree with the static ones
    on less than ``low`` of their overlap (the first signal to look at, docs/troubleshooting.md)."""
    means = " ".join(f"{SHORT[n]} {_fmt(summary[f'class_mean_{n}'], n)}" for n in SIGNALS if n != "separation")
    flagged = [class_names[k] for k, v in enumerate(summary["static_agreement"]) if not math.isnan(v) and v < low]
    return (f" | signals (round so far, label-free) {means}; dynamic/static agreement < {100 * low:.0f}%: "
            + (", ".join(flagged) if flagged else "none"))


def table(summary: dict, class_names) -> str:
    """A Markdown table of every signal per class (classes with neither a dynamic nor a static label left out)."""
    lines = ["| class | " + " | ".join(SIGNALS) + " |", "|---|" + "---:|" * len(SIGNALS)]
    counts = summary["counts"]
    for k, name in enumerate(class_names):
        if counts["dynamic"][k] or counts["static"][k] or counts["hybrid"][k]:
            lines.append(f"| {name} | " + " | ".join(_fmt(summary[n][k], n) for n in SIGNALS) + " |")
    lines.append("| **class mean** | " + " | ".join(f"**{_fmt(summary[f'class_mean_{n}'], n)}**" for n in SIGNALS)
                 + " |")
    return "\n".join(lines)
