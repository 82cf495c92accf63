r"""What a run reports: target-val evaluation, the log point, the end of a round, and :func:`finish`.

- :func:`evaluate`: target val mIoU of the current model (sharded over ranks), logged and added to the curves;
- :func:`log_point`: THE host read of the step statistics (every ``--log-every`` steps): the log line, the curves,
  TensorBoard, the non-finite guard;
- :func:`end_round`: a round's evaluation record, diagnostics (``--diagnostics``), label-free signals
  (``--signals``) and the pseudo-label figure of its last batch (data flows one way: the figure shows what the
  step computed);
- :func:`finish`: metrics.json, the curves, the per-class table and the last line
  ``target mIoU: source-only X.XX -> adapted Y.YY`` (with round decisions: which rounds were kept).
"""

from __future__ import annotations

import json
import time

import torch
from torch import Tensor

from protocl.distributed import all_reduce_sum_

from . import decisions, diagnostics, figures, signals
from .evaluate import evaluate as evaluate_model
from .evaluate import iou_table
from .run import AMP_DTYPES, Run

LOSS_TERMS = ("ce_src", "ce_tgt", "ent", "fcl", "bcl", "ce_mix", "mic", "fd")  # the log line's, in this order

__all__ = ["evaluate", "log_point", "end_round", "finish", "budget_line", "last_line", "bad_samples", "record_skips",
           "scalars"]


def evaluate(run: Run, state: dict, label: str, *, delivered: dict | None = None) -> dict:
    """Target val mIoU of the current model (sharded over ranks), logged and added to the curves at the iterations
    the model has trained (an undone round's point becomes a marker of its own, :func:`uda.decisions.decide`);
    ``delivered``: the decision record (or its ``control``) of a delivered best-scored model, a marker too."""
    if run.world > 1:  # each rank's last forward updated its own BatchNorm statistics; rank 0's are the ones saved
        for buffer in run.model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    result = evaluate_model(run.model, run.val_loader, run.num_classes, run.device, subsets=run.subsets,
                            amp_dtype=AMP_DTYPES[run.args.amp])
    if hasattr(run.val_loader, "take"):  # files left out of the score (--on-bad-sample skip)
        record_skips(run, state, run.val_loader.take(), "left out of the evaluation")
    h, a = state["history"], run.args
    x = state["step"] if state["phase"] == "source" else a.source_iters + state["round"] * a.round_iters + \
        state["iteration"]  # the iterations in the model: the same axis for the adapted run and the control
    curve = "control" if state["phase"] == "control" else "eval"
    if delivered is not None:
        x = decisions.model_iterations(delivered["best_contains"] or ["stage 1"], a.source_iters, a.round_iters)
        curve = "delivered_control" if state["phase"] == "control" else "delivered"
    h.setdefault(f"{curve}_iter", []).append(x)
    h.setdefault(f"{curve}_miou", []).append(result["miou"])
    extra = "".join(f", mIoU{n} {result[f'miou{n}']:.2f}" for n in (run.subsets or {}))
    run.log(f"eval {label}: target val mIoU {result['miou']:.2f}{extra}")
    scalars(run, state, "eval_control" if state["phase"] == "control" else "eval",
            {k: v for k, v in result.items() if k.startswith("miou")})
    return result


def log_point(run: Run, state: dict, kind: str, sums: dict[str, Tensor]) -> None:
    """THE log point of both loops: the only host read of the step statistics (their means since the last log
    point), then the log line, the curves and TensorBoard; ``sums`` is emptied."""
    a = run.args
    n = state["iteration"] % a.log_every or a.log_every  # steps since the last log point
    means = {k: float(v) / n for k, v in sums.items()}
    sums.clear()
    undone = sum(not e["kept"] for e in state["decisions"]["rounds"])  # --round-decisions: each adds a fallback
    total = a.source_iters + a.rounds * a.round_iters * (2 if a.control else 1) + undone * a.round_iters
    rate = (state["step"] - run.started[1]) / max(1e-9, time.time() - run.started[0])
    control = "source-only control" if a.recipe == "daformer" else f"control round {state['round']}"
    where = {"source": "stage 1", "control": control, "teacher": "mean teacher",
             "fallback": f"stage 2 round {state['round']} ({decisions.FALLBACKS[a.fallback]} fallback)"}.get(kind, f"stage 2 round {state['round']}")
    line = (f"[{state['step']}/{total}] {rate:.2f} it/s eta {(total - state['step']) / max(rate, 1e-9) / 60:.1f} min"
            f" | {where} it {state['iteration']} | "
            + " ".join(f"{k} {means[k]:.3f}" for k in LOSS_TERMS if k in means))
    if "pl_weight" in means:  # train_daformer.py: the pseudo-label weight (the confident share of the batch)
        line += f" | pseudo-label weight {means['pl_weight']:.3f}"
        state["history"]["log_iter"].append(state["step"])
        state["history"].setdefault("pseudo_weight", []).append(100 * means["pl_weight"])
    if kind == "adapt":
        line += (" | coverage static/dynamic/hybrid "
                 f"{means['cov_static']:.0f}/{means['cov_dynamic']:.0f}/{means['cov_hybrid']:.0f}%")
        if a.diagnostics:  # the round so far, summed over ranks (a collective: every rank is here)
            counts = all_reduce_sum_(state["label_counts"].clone())
            summary = {n: diagnostics.summarize(counts[i]) for i, n in enumerate(diagnostics.LABEL_KINDS)}
            line += " | class-mean coverage/precision " + " ".join(
                f"{n} {diagnostics.pct(v['class_mean_coverage'])}/{diagnostics.pct(v['class_mean_precision'])}"
                for n, v in summary.items()) + "% (round so far, target GT, diagnostic only)"
            for n, v in summary.items():
                means[f"class_mean_coverage_{n}"] = v["class_mean_coverage"]
                means[f"class_mean_precision_{n}"] = v["class_mean_precision"]
        if a.signals:  # label-free: what a user without target labels can read (a collective, like the above)
            line += signals.log_summary(signals.summarize(all_reduce_sum_(state["signal_counts"].clone())),
                                        run.table.names)
        state["history"]["log_iter"].append(state["step"] - a.source_iters)
        for name in diagnostics.LABEL_KINDS:
            state["history"][f"coverage_{name}"].append(means[f"cov_{name}"])
    run.log(line)
    scalars(run, state, "control" if kind == "control" else "train", means)
    if run.guard is not None:  # the guard's one host read, next to the losses' (a non-finite term stops here)
        run.guard.check(state["step"])


def scalars(run: Run, state: dict, prefix: str, values: dict[str, float]) -> None:
    """TensorBoard scalars (``--tensorboard``) at ``state["step"]``."""
    if run.tb is not None:
        for name, value in values.items():
            run.tb.add_scalar(f"{prefix}/{name}", value, state["step"])


def end_round(run: Run, state: dict, result: dict, last: tuple[dict, dict[str, Tensor]] | None) -> None:
    """At the end of a round of stage 2 (every rank): its mIoU in ``metrics["rounds"]``, its pseudo-label
    diagnostics (``--diagnostics``) and label-free signals (``--signals``) in metrics.json and the log, and the
    figure of its last training batch ``last = (target batch, labels)``; the round's counts are then reset."""
    state["metrics"].setdefault("rounds", []).append({"round": state["round"], "miou": result["miou"], "kept": True})
    if run.args.diagnostics:
        round_diagnostics(run, state)
    if run.args.signals:
        round_signals(run, state)
    if run.rank == 0 and last is not None:
        round_figure(run, state["round"], *last)
    state["label_counts"].zero_()
    state["signal_counts"].zero_()


def round_signals(run: Run, state: dict) -> dict:
    """The round's label-free signals (the counts summed over ranks: a collective) into
    ``state["metrics"]["signals"]`` (metrics.json) and a per-class table in the log. Returns the entry."""
    counts = all_reduce_sum_(state["signal_counts"].clone())
    entry = {"round": state["round"], **signals.summarize(counts, run.contrast.target_ema)}
    state["metrics"].setdefault("signals", []).append(entry)
    run.log(f"round {state['round']}: label-free reliability signals of the dynamic labels (no target label read; "
            "higher is more reliable, except inflation; docs/troubleshooting.md):\n"
            + signals.table(entry, run.table.names))
    return entry


def round_diagnostics(run: Run, state: dict) -> None:
    """Store and log the round's per-class coverage and precision of static, dynamic and hybrid labels."""
    counts = all_reduce_sum_(state["label_counts"].clone())
    entry = {n: diagnostics.summarize(counts[i]) for i, n in enumerate(diagnostics.LABEL_KINDS)}
    state["metrics"].setdefault("diagnostics", []).append({"round": state["round"], **entry})
    run.log(f"round {state['round']}: pseudo labels on the round's target crops against target ground truth "
            "(coverage = labelled share of the class's pixels, precision = correct share of the pixels labelled "
            "with the class; %, diagnostic only):\n" + diagnostics.table(entry, run.table.names))


def round_figure(run: Run, round_index: int, tgt: dict, labels: dict[str, Tensor]) -> None:
    """The round's last training batch: target crop | static | dynamic | hybrid (| ground truth with
    ``--diagnostics``), as the step computed them."""
    rows = []
    for i in range(tgt["image"].shape[0]):
        row = {"image": tgt["image"][i].permute(1, 2, 0).cpu().numpy()}
        row.update({k: v[i].cpu().numpy() for k, v in labels.items()})
        if "label" in tgt:
            row["gt"] = tgt["label"][i].cpu().numpy()
        rows.append(row)
    figures.pseudo_label_panel(rows, run.out / "figures" / f"pseudo_labels_round_{round_index:02d}.png",
                               class_names=run.table.names, palette=run.table.colours)


def record_skips(run: Run, state: dict, records: list[tuple[str, str]], what: str) -> None:
    bad = state["bad_samples"]
    for path, message in records:
        bad["skipped"] += 1
        if path not in bad["files"]:
            bad["files"].append(path)
        run.log(f"warning: skipped {path!r}, {what} (--on-bad-sample skip): {message}")


def bad_samples(run: Run, state: dict) -> dict:
    """``{"skipped", "files"}`` of the bad files skipped so far (``--on-bad-sample skip``), over all ranks (a
    collective under torch.distributed: every rank calls it). Each rank counts its own; on a resume rank 0
    holds the total written in the checkpoint, the others start from zero."""
    own = state["bad_samples"]
    if run.world == 1:
        return {"skipped": own["skipped"], "files": sorted(own["files"])}
    gathered = [None] * run.world
    torch.distributed.all_gather_object(gathered, own)
    return {"skipped": sum(g["skipped"] for g in gathered), "files": sorted({f for g in gathered for f in g["files"]})}


def finish(run: Run, state: dict) -> None:
    """After training (the last checkpoint is written): metrics.json, the curves, the per-class table and the last
    line (:func:`last_line`) (rank 0)."""
    m = state["metrics"]
    skipped = bad_samples(run, state)  # (a collective)
    if run.rank != 0:
        return
    metrics = {k: m[k] for k in ("source_only", "adapted", "source_only_continued", "adapted_last", "control_last",
                                 "rounds", "diagnostics", "signals") if k in m}
    names = run.table.names
    metrics.update(config=run.config, class_names=list(names), bad_samples=skipped)
    decided = decisions.enabled(run) and state["decisions"]["best_from"] is not None  # which rounds were kept, why
    if decided:
        metrics["round_decisions"] = state["decisions"]
    if run.subsets:
        metrics["class_subsets"] = {n: [names[k] for k in ks] for n, ks in run.subsets.items()}
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    figures.training_curves(state["history"], run.out / "figures" / "training_curves.png")
    columns = {"source-only": m["source_only"]["iou"]} if "source_only" in m else {}  # train_daformer --no-control
    columns["adapted"] = m["adapted"]["iou"]
    if "source_only_continued" in m:
        columns["source-only, same budget"] = m["source_only_continued"]["iou"]
    what = "16-class protocol, n/a = not among the 16" if run.subsets else f"{len(names)} classes"
    run.log(f"per-class IoU on target val (%, {what}):\n" + iou_table(columns, names))
    if "source_only_continued" in m:
        run.log(budget_line(run, state))
    if run.subsets and "source_only" in m:
        run.log("target mIoU over 16 classes (13 classes): source-only "
                f"{m['source_only']['miou16']:.2f} ({m['source_only']['miou13']:.2f}) -> adapted "
                f"{m['adapted']['miou16']:.2f} ({m['adapted']['miou13']:.2f})")
    run.log(last_line(run, state))


def budget_line(run: Run, state: dict) -> str:
    """The same-budget control's line: its iterations, and with round decisions what the adapted run spent (an
    undone round's budget twice) and how the control was selected."""
    a, m, record = run.args, state["metrics"], state["decisions"]
    undone = sum(not e["kept"] for e in record["rounds"])
    line = (f"source-only trained for the same total iterations ({a.source_iters} + {a.rounds * a.round_iters}): "
            f"{m['source_only_continued']['miou']:.2f}")
    if record.get("control") is None:
        return line
    spent = a.source_iters + (a.rounds + undone) * a.round_iters
    return (f"same-budget control: source-only on the adapted run's schedule ({a.source_iters} + {a.rounds}x"
            f"{a.round_iters} iterations; the adapted run spent {spent}, {undone} undone round(s) spent again), "
            f"selected by the same label-free score at the same points: {m['source_only_continued']['miou']:.2f} ("
            f"{decisions.control_summary(record, a.source_iters, a.round_iters)}; its last model "
            f"{m.get('control_last', m['source_only_continued'])['miou']:.2f})")


def last_line(run: Run, state: dict) -> str:
    """``target mIoU: source-only X.XX -> adapted Y.YY``; with round decisions, which model was delivered, what it
    contains, the kept rounds and the last model's mIoU."""
    a, m, record = run.args, state["metrics"], state["decisions"]
    if a.recipe == "daformer":  # no stage 1: the source-only number is the same-budget control
        if "source_only" not in m:
            return f"target mIoU: adapted {m['adapted']['miou']:.2f} (no source-only control: --no-control)"
        return (f"target mIoU: source-only {m['source_only']['miou']:.2f} -> adapted {m['adapted']['miou']:.2f} "
                f"(source-only = the same network on source alone for the same {a.iters} iterations from the same "
                "initial weights: the same-budget control)")
    line = f"target mIoU: source-only {m['source_only']['miou']:.2f} -> adapted {m['adapted']['miou']:.2f}"
    if not decisions.enabled(run) or record["best_from"] is None:
        return line
    last = m.get("adapted_last", m["adapted"])["miou"]
    return (line + f" ({decisions.summary(record, a.rounds, a.source_iters, a.round_iters)}; the last model "
            f"{last:.2f})")
