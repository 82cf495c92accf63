r"""Does adaptation beat source-only training given the same iterations, beyond the demo? (issue 11)

For each shift (the embedded demo and the two shifts of :mod:`benchmarks.study.shifts`) and each seed:

1. write the dataset (seeded like the demo: the data seed is the run seed);
2. train the source model once, to a plateau (``--source-iters``, evaluated on target val every
   ``--curve-every`` iterations for the plateau curve), and keep ``source_only.pt``;
3. from that one checkpoint (``--source-checkpoint``), run stage 2 for every variant:

   * ``full``: the method, with the same-budget control (``--control``: source-only continued for the same
     stage-2 iterations with the same lr schedule) in the same run;
   * ``no_contrastive`` (``--no-contrastive``), ``no_dynamic`` (``--no-dynamic``), ``no_calibration``
     (``--no-calibration``), ``static_only`` (``--no-dynamic --no-contrastive``: plain self-training on the
     static labels with the pipeline's CE + entropy terms; the orchestrator still runs, with zero weights);
   * ``gated``, ``agreement``, ``either``: a dynamic-label gate on the target CE's labels
     (:mod:`benchmarks.study.gates`, through ``adapt_step``'s ``target_labels`` hook); ``threshold_0.95``.

The study builds every run as the pipeline does (``uda.options.parse_args`` + ``train_gta2cs.setup``) and
calls the pipeline's functions; nothing is subclassed or patched.

Per-class label diagnostics, against target ground truth (a diagnostic: never trained on), all with the
pipeline's ``uda.diagnostics`` (one implementation, one class-mean rule): for the static labels from the
PNGs written under ``<run>/pseudo_labels/round_XX`` over the whole target train split, and for the static /
dynamic / hybrid labels of the training crops of every stage-2 step (the pipeline's own ``--diagnostics``, per
class and round, stored in each run's metrics.json).

Writes ``<out>/<tag>/results.json`` and ``results.md`` (per shift, per seed) and ``stage1_curves.png``; every
finished run is cached as JSON under ``--work`` so an interrupted study continues where it stopped.

    python -m benchmarks.study.adaptation_study --tag before            # the full table (about 40 min, 1 thread)
    python -m benchmarks.study.adaptation_study --tag fix --stage2-args "--lr 1e-3"   # stage-2 options, every run
    python -m benchmarks.study.adaptation_study --tag v2 --source-iters 2000 --cached-only   # tables only

``--cached-only`` starts no run: it writes the tables from the per-run cache in ``--work`` and, for what is not
there, from the tag's stored ``results.json`` (so the committed tables can be rebuilt on any machine).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import train_gta2cs
from uda import diagnostics, options
from uda.classes import CITYSCAPES_NAMES
from uda.datasets import cityscapes_files
from uda.demo import write_demo_dataset
from uda.evaluate import evaluate
from uda.score import average_ranks
from uda.labels import read_label
from PIL import Image

from .gates import target_labels_hook
from .shifts import SHIFTS, write_shift

ROOT = Path(__file__).resolve().parents[2]
K = len(CITYSCAPES_NAMES)
DEMOS = {"demo": "gta5", "synthia": "synthia"}  # the embedded demo, with its source in the GTA5 / SYNTHIA layout
SHIFT_NAMES = (*DEMOS, *SHIFTS)
# variant -> (pipeline options, dynamic-label gate of the target CE or None)
PAPER = ["--round-decisions", "off"]  # the paper's rounds: every round kept, the last model delivered
STRICT = ["--round-decisions", "score", "--score-tolerance", "0"]  # issue 27's decisions before the tolerance
VARIANTS = {
    "full": (["--control", *PAPER], None),
    "gated": (["--no-control", *PAPER], "prediction"),
    "threshold_0.95": (["--no-control", *PAPER, "--threshold", "0.95"], None),
    "agreement": (["--no-control", *PAPER], "agreement"),
    "either": (["--no-control", *PAPER], "either"),
    "no_contrastive": (["--no-control", *PAPER, "--no-contrastive"], None),
    "no_dynamic": (["--no-control", *PAPER, "--no-dynamic"], None),
    "no_calibration": (["--no-control", *PAPER, "--no-calibration"], None),
    "static_only": (["--no-control", *PAPER, "--no-dynamic", "--no-contrastive"], None),
    # issue 20's candidate fixes (benchmarks.study.gates): the target CE's labels only
    "hires": (["--no-control", *PAPER], "hires"),
    "margin": (["--no-control", *PAPER], "margin"),
    "class_off": (["--no-control", *PAPER], "class_off"),
    "hires_margin": (["--no-control", *PAPER], "hires_margin"),
    # issue 27: round decisions by the label-free score (uda.decisions), strict (any fall undoes a round): the runs
    # were made before --score-tolerance 0.003 became the default, which is the variant decide_tol
    "decide": (["--no-control", *STRICT], None),
    # issue 27's options on top of the strict decisions: tolerance, fallbacks, reliability in the contrast
    "decide_tol": (["--no-control", "--round-decisions", "score", "--score-tolerance", "0.003"], None),
    "reliability": (["--no-control", *STRICT, "--reliability-weight"], None),
    "rectify": (["--no-control", *STRICT, "--rectify"], None),
    "purity": (["--no-control", *STRICT, "--proto-resize", "purity"], None),
    "fallback_static": (["--no-control", *STRICT, "--fallback", "static"], None),
    "fallback_drop": (["--no-control", *STRICT, "--fallback", "drop-flagged"], None),
}


def source_flag(shift: str) -> str:
    return "--synthia-root" if shift == "synthia" else "--gta5-root"


def static_png_counts(run_dir: Path, cityscapes_root: str, round_index: int) -> torch.Tensor:
    """:func:`uda.diagnostics.class_counts` of the written static labels of one round against target train
    ground truth, summed over the split, ``(4, K)``."""
    folder = run_dir / "pseudo_labels" / f"round_{round_index:02d}"
    counts = torch.zeros(4, K, dtype=torch.int64)
    for sample in cityscapes_files(cityscapes_root, "train"):
        static = np.array(Image.open(folder / f"{sample.name}.png"))
        gt = read_label(sample.label, static.shape[::-1])
        counts += diagnostics.class_counts(torch.from_numpy(static).long(), torch.from_numpy(gt).long(), K)
    return counts


def dataset(shift: str, seed: int, work: Path) -> tuple[str, str]:
    root = work / "data" / f"{shift}_seed{seed}"
    if shift in DEMOS:
        gta, cs = write_demo_dataset(root, seed=seed, source=DEMOS[shift])
    else:
        gta, cs = write_shift(shift, root, seed=seed)
    return str(gta), str(cs)


def stage1(shift: str, seed: int, work: Path, source_iters: int, curve_every: int, stored: dict | None = None
           ) -> dict | None:
    out = work / "runs" / f"{shift}_seed{seed}" / f"stage1_{source_iters}"
    cached = out / "stage1.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if stored is not None:  # --cached-only
        return stored.get("stage1", {}).get(shift, {}).get(str(seed))
    gta, cs = dataset(shift, seed, work)
    argv = [source_flag(shift), gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out", str(out),
            "--source-iters", str(source_iters), "--ckpt-every", str(curve_every), "--no-control"]
    t0 = time.time()
    run = train_gta2cs.setup(options.parse_args(argv))
    state = train_gta2cs.start(run)
    curve = []
    for until in range(curve_every, source_iters, curve_every):  # the plateau curve: target val every curve_every
        train_gta2cs.train_source(run, state, until=until)
        result = evaluate(run.model, run.val_loader, K, run.device, subsets=run.subsets)  # (SYNTHIA: mIoU16)
        curve.append((until, result["miou"]))
    train_gta2cs.train_source(run, state)
    train_gta2cs.end_source(run, state)
    source_only = state["metrics"]["source_only"]
    result = {"checkpoint": str(out / "source_only.pt"), "miou": source_only["miou"], "iou": source_only["iou"],
              "curve": curve + [(source_iters, source_only["miou"])], "wall_s": time.time() - t0, "argv": argv}
    cached.write_text(json.dumps(result))
    return result


def stage2(shift: str, seed: int, work: Path, variant: str, tag: str, source: dict, extra: list[str],
           stored: dict | None = None) -> dict | None:
    out = work / "runs" / f"{shift}_seed{seed}" / f"{tag}_{variant}"
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if stored is not None:  # --cached-only
        return stored.get("stage2", {}).get(shift, {}).get(str(seed), {}).get(variant)
    gta, cs = dataset(shift, seed, work)
    flags, gate = VARIANTS[variant]
    argv = ([source_flag(shift), gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out", str(out),
             "--source-checkpoint", source["checkpoint"], "--diagnostics",
             "--source-iters", source["argv"][source["argv"].index("--source-iters") + 1]] + flags + extra)
    t0 = time.time()
    run = train_gta2cs.setup(options.parse_args(argv))
    step = train_gta2cs.adapt_step
    if gate is not None:
        step = functools.partial(train_gta2cs.adapt_step,
                                 target_labels=target_labels_hook(gate, K, threshold=run.contrast.threshold))
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step=step)
    train_gta2cs.finish(run, state)
    wall = time.time() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"argv": argv, "gate": gate, "wall_s": wall, "source_only": metrics["source_only"]["miou"],
              "adapted": metrics["adapted"]["miou"], "adapted_iou": metrics["adapted"]["iou"],
              "rounds": [r["miou"] for r in metrics["rounds"]]}
    if "source_only_continued" in metrics:
        result["control"] = metrics["source_only_continued"]["miou"]
        result["control_iou"] = metrics["source_only_continued"]["iou"]
    if "round_decisions" in metrics:  # --round-decisions: the score per round and what was kept
        result["round_decisions"] = metrics["round_decisions"]
    result["labels_train_crops"] = metrics.get("diagnostics", [])  # per round: the pipeline's --diagnostics
    result["signals"] = [  # per round: the label-free signals (uda.signals) and each class's dynamic pixels
        {**entry, "dynamic_pixels": entry["counts"]["dynamic"]} for entry in metrics.get("signals", [])]
    result["static_png"] = {f"round{r}": diagnostics.summarize(static_png_counts(out, cs, r))
                            for r in range(run.args.rounds)}
    losses = [line for line in (out / "log.txt").read_text().splitlines() if "ce_tgt" in line]
    result["last_loss_line"] = losses[-1] if losses else ""
    cached.write_text(json.dumps(result))
    return result


def fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


LABELS = {
    "full": "**adapted (full method)**", "gated": "`--gate-dynamic prediction`",
    "threshold_0.95": "`--threshold 0.95`", "agreement": "`--gate-dynamic agreement`",
    "either": "`--gate-dynamic either`",  # (the gates' names of the v2 tables; now benchmarks.study.gates)
    "no_contrastive": "`--no-contrastive`", "no_dynamic": "`--no-dynamic`", "no_calibration": "`--no-calibration`",
    "static_only": "static labels only (`--no-dynamic --no-contrastive`)",
    "hires": "`hires`: dynamic labels at label resolution", "margin": "`margin`: margin ≥ 0.05 rejection",
    "class_off": "`class_off`: a class's dynamic labels off below 50 % agreement",
    "hires_margin": "`hires_margin`: `hires` + margin ≥ 0.05 at label resolution",
    "decide": "`--round-decisions score --score-tolerance 0`: a round kept only if `flip_agreement` did not fall",
    "decide_tol": "decide + `--score-tolerance 0.003` (the default since issue 27)", "reliability": "decide + `--reliability-weight`",
    "rectify": "decide + `--rectify`", "purity": "decide + `--proto-resize purity`",
    "fallback_static": "decide + `--fallback static`", "fallback_drop": "decide + `--fallback drop-flagged`",
}


def _mean(values: list) -> float | None:
    done = [v for v in values if v is not None]
    return sum(done) / len(done) if done else None


def tables(results: dict, seeds: list[int], stage1_info: dict) -> str:
    """A summary (per shift: means over the seeds) and one table per shift (per seed)."""
    summary = ["| shift | source-only | same-budget control | adapted (full method) | adapted − control |",
               "| --- | ---: | ---: | ---: | ---: |"]
    lines = []
    for shift, per_seed in results.items():
        lines += [f"### {shift}", "", "| run (target val mIoU %) | " + " | ".join(f"seed {s}" for s in seeds)
                  + " | mean | vs control |", "| --- |" + " ---: |" * (len(seeds) + 2)]
        stage1_miou = [stage1_info[shift].get(s, {}).get("miou") for s in seeds]  # None: not run (n/a)
        rows: dict[str, list] = {"source-only (stage 1, plateau)": stage1_miou}
        per_seed = {s: per_seed.get(s, {}) for s in seeds}
        full = [per_seed[s].get("full") for s in seeds]
        if all(full):
            rows["same-budget control"] = [f["control"] for f in full]
        for variant in VARIANTS:
            values = [per_seed[s].get(variant) for s in seeds]
            if any(values):
                rows[LABELS.get(variant, variant)] = [v["adapted"] if v else None for v in values]
        control = rows.get("same-budget control")
        for name, values in rows.items():
            mean, delta = _mean(values), ""
            if control and mean is not None and name != "same-budget control":
                pairs = [(v, c) for v, c in zip(values, control) if v is not None]
                delta = f"{sum(v - c for v, c in pairs) / len(pairs):+.2f}"
            lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(mean)} | {delta} |")
        if control and all(full):
            adapted = [f["adapted"] for f in full]
            summary.append(f"| {shift} | {fmt(_mean(stage1_miou))} | {fmt(_mean(control))} "
                           f"| {fmt(_mean(adapted))} | {_mean(adapted) - _mean(control):+.2f} |")
        walls = [per_seed[s][v]["wall_s"] for s in seeds for v in per_seed[s]]
        s1 = [info["wall_s"] for info in stage1_info[shift].values()] or [math.nan]
        lines += ["", f"Wall time: stage 1 {min(s1):.0f}–{max(s1):.0f} s per seed; stage-2 runs "
                  f"{min(walls):.0f}–{max(walls):.0f} s each (the full run includes its control)." if walls else "", ""]
    return "\n".join(["Means over the seeds:", "", *summary, "", *lines])


CANDIDATES = ("hires", "margin", "class_off", "hires_margin")  # issue 20's candidate fixes
MIN_SUPPORT = 100  # a class enters the signal validation of a round with at least this many dynamic pixels


def parse_iters_for(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, int]:
    """``--source-iters-for SHIFT=N ...`` as ``{shift: N}`` (a parser error naming the bad item)."""
    iters_for = {}
    for item in items:
        shift, _, n = item.partition("=")
        if shift not in SHIFT_NAMES or not n.isdigit():
            parser.error(f"--source-iters-for: expected SHIFT=N with SHIFT in {SHIFT_NAMES}, got {item!r}")
        iters_for[shift] = int(n)
    return iters_for


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties) of the pairs where both values are defined; NaN with
    fewer than 3 pairs or a constant side."""
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    if len(pairs) < 3:
        return math.nan

    rx, ry = average_ranks([a for a, _ in pairs]), average_ranks([b for _, b in pairs])
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def signal_rhos(run: dict, name: str) -> list[float]:
    """Per round of one run: Spearman, over the classes with at least MIN_SUPPORT dynamic pixels, between signal
    ``name`` and the true precision of the dynamic labels (the run's --diagnostics)."""
    rhos = []
    for sig, diag in zip(run.get("signals", []), run.get("labels_train_crops", [])):
        support = sig.get("dynamic_pixels") or [MIN_SUPPORT] * len(sig[name])
        values = [v if n >= MIN_SUPPORT else math.nan for v, n in zip(_nan(sig[name]), support)]
        rhos.append(spearman(values, _nan(diag["dynamic"]["precision"])))
    return rhos


def _nan(values: list) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def validation_table(results: dict, seeds: list[int]) -> str:
    """Mean Spearman (over seeds × rounds of the paper-default runs) of each signal with the dynamic labels' true
    per-class precision, per shift; in brackets the share of (seed, round) cells with the expected sign."""
    from uda.signals import HIGHER_IS_BETTER, SIGNALS

    head = "| shift | " + " | ".join(f"`{n}`" for n in SIGNALS) + " |"
    lines = [head, "| --- |" + " ---: |" * len(SIGNALS)]
    pooled: dict = {n: [] for n in SIGNALS}
    for shift, per_seed in results.items():
        cells = []
        for name in SIGNALS:
            rhos = [r for s in seeds if per_seed.get(s, {}).get("full") for r in signal_rhos(per_seed[s]["full"], name)]
            rhos = [r for r in rhos if not math.isnan(r)]
            pooled[name] += rhos
            sign = 1 if HIGHER_IS_BETTER[name] else -1
            cells.append(f"{sum(rhos) / len(rhos):+.2f} ({sum(sign * r > 0 for r in rhos)}/{len(rhos)})" if rhos
                         else "n/a")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    cells = []
    for name in SIGNALS:
        rhos, sign = pooled[name], 1 if HIGHER_IS_BETTER[name] else -1
        cells.append(f"**{sum(rhos) / len(rhos):+.2f}** ({sum(sign * r > 0 for r in rhos)}/{len(rhos)})" if rhos
                     else "n/a")
    lines.append("| **all shifts** | " + " | ".join(cells) + " |")
    return "\n".join(lines)


AGREEMENTS = ("static_agreement", "prediction_agreement", "hybrid_prediction_agreement")


def agreement_error_table(results: dict, seeds: list[int]) -> str:
    """How close the agreement signals (shares, like precision) come to the true precision of the dynamic labels in
    absolute terms: per shift, the mean over the paper-default runs' classes × rounds (at least MIN_SUPPORT dynamic
    pixels) of signal − precision, in percentage points, and the mean absolute difference."""
    lines = ["| shift | " + " | ".join(f"`{n}`: mean diff / mean abs diff" for n in AGREEMENTS) + " |",
             "| --- |" + " ---: |" * len(AGREEMENTS)]
    for shift, per_seed in results.items():
        cells = []
        for name in AGREEMENTS:
            diffs = []
            for s in seeds:
                run = per_seed.get(s, {}).get("full") or {}
                for sig, diag in zip(run.get("signals", []), run.get("labels_train_crops", [])):
                    support = sig.get("dynamic_pixels") or [MIN_SUPPORT] * len(sig[name])
                    for v, p, n in zip(_nan(sig[name]), _nan(diag["dynamic"]["precision"]), support):
                        if n >= MIN_SUPPORT and not (math.isnan(v) or math.isnan(p)):
                            diffs.append(100 * v - p)
            cells.append(f"{sum(diffs) / len(diffs):+.1f} / {sum(map(abs, diffs)) / len(diffs):.1f}" if diffs
                         else "n/a")
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def decision_table(results: dict, seeds: list[int]) -> str:
    """Per candidate and shift: mean − control mean, mean − paper-default mean, and the default's seed spread (the
    standard deviation of its per-seed mIoU). A candidate qualifies as the new default only if on every shift its
    mean is >= the control's and >= the default's minus that spread."""
    lines = ["| candidate | " + " | ".join(results) + " | qualifies |", "| --- |" + " ---: |" * len(results) + " :---: |"]
    for cand in CANDIDATES:
        cells, ok = [], True
        for per_seed in results.values():
            full = [per_seed.get(s, {}).get("full") for s in seeds]
            mine = [per_seed.get(s, {}).get(cand) for s in seeds]
            if not all(full) or not all(mine):
                cells.append("n/a")
                ok = None if ok is not False else False
                continue
            m, d, c = (_mean([r["adapted"] for r in mine]), _mean([r["adapted"] for r in full]),
                       _mean([r["control"] for r in full]))
            spread = float(np.std([r["adapted"] for r in full], ddof=1))
            cells.append(f"{m - c:+.2f} / {m - d:+.2f} (±{spread:.2f})")
            ok = ok if ok is None else ok and m >= c and m >= d - spread
        verdict = "n/a" if ok is None else "**yes**" if ok else "no"
        lines.append(f"| `{cand}` | " + " | ".join(cells) + f" | {verdict} |")
    return "\n".join(lines)


ROUND_OPTIONS = ("decide_tol", "reliability", "rectify", "purity", "fallback_static", "fallback_drop")  # issue 27


def _spread(values: list[float]) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def means_table(results: dict, seeds: list[int], stage1_info: dict, variants: tuple[str, ...]) -> str:
    """Per shift, the mean (± seed spread, the standard deviation over the seeds) of source-only, the same-budget
    control, the paper default (``full``) and each of ``variants``; n/a unless every seed has the run."""
    rows = [("source-only", lambda per, s: stage1_info[per].get(s, {}).get("miou")),
            ("same-budget control", lambda per, s: (results[per].get(s, {}).get("full") or {}).get("control")),
            ("paper default (`--round-decisions off`)",
             lambda per, s: (results[per].get(s, {}).get("full") or {}).get("adapted"))]
    rows += [(LABELS.get(v, v), lambda per, s, v=v: (results[per].get(s, {}).get(v) or {}).get("adapted"))
             for v in variants]
    lines = ["| run (target val mIoU %, mean ± seed spread) | " + " | ".join(results) + " | mean over shifts |",
             "| --- |" + " ---: |" * (len(results) + 1)]
    for name, get in rows:
        cells, means = [], []
        for shift in results:
            values = [get(shift, s) for s in seeds]
            if any(v is None for v in values):
                cells.append("n/a")
                continue
            means.append(sum(values) / len(values))
            cells.append(f"{means[-1]:.2f} ± {_spread(values):.2f}")
        overall = f"{sum(means) / len(means):.2f}" if len(means) == len(results) else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall} |")
    return "\n".join(lines)


def default_rule_table(results: dict, seeds: list[int], variants: tuple[str, ...]) -> str:
    """Issue 27's rule for a new default, per candidate and shift (means over the seeds): candidate − control
    (must be ≥ −the control's seed spread) and candidate − paper default (≥ −its spread); whether it clears the
    rule on every shift, and its mean over shifts against the current default (``decide``)."""
    lines = ["| candidate | " + " | ".join(results) + " | clears the rule | − decide, mean over shifts |",
             "| --- |" + " ---: |" * len(results) + " :---: | ---: |"]
    for cand in variants:
        cells, ok, gains = [], True, []
        for per_seed in results.values():
            full = [per_seed.get(s, {}).get("full") for s in seeds]
            mine = [per_seed.get(s, {}).get(cand) for s in seeds]
            decide = [per_seed.get(s, {}).get("decide") for s in seeds]
            if not all(full) or not all(mine):
                cells.append("n/a")
                ok = None if ok is not False else False
                continue
            m = _mean([r["adapted"] for r in mine])
            control, paper = [r["control"] for r in full], [r["adapted"] for r in full]
            c, d, sc, sd = _mean(control), _mean(paper), _spread(control), _spread(paper)
            cells.append(f"{m - c:+.2f} (±{sc:.2f}) / {m - d:+.2f} (±{sd:.2f})")
            ok = ok if ok is None else ok and m >= c - sc and m >= d - sd
            if all(decide):
                gains.append(m - _mean([r["adapted"] for r in decide]))
        verdict = "n/a" if ok is None else "**yes**" if ok else "no"
        gain = f"{sum(gains) / len(gains):+.2f}" if gains and len(gains) == len(results) else "n/a"
        lines.append(f"| {LABELS.get(cand, cand)} | " + " | ".join(cells) + f" | {verdict} | {gain} |")
    return "\n".join(lines)


def _compact(value):
    """Floats to 2 decimals and without the raw pixel counts of the diagnostics (derivable from the rest)."""
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 2)
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items() if k != "counts"}
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value


def plot_curves(stage1_info: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(stage1_info), figsize=(4 * len(stage1_info), 3), squeeze=False)
    for ax, (shift, per_seed) in zip(axes[0], stage1_info.items()):
        for seed, info in per_seed.items():
            it, miou = zip(*info["curve"])
            ax.plot(it, miou, marker="o", ms=3, label=f"seed {seed}")
        ax.set_title(f"{shift}: stage 1 (source only)")
        ax.set_xlabel("iteration")
        ax.set_ylabel("target val mIoU %")
        if per_seed:  # (a shift without any run: an empty panel)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", nargs="+", default=list(SHIFT_NAMES), choices=SHIFT_NAMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                   help="stage-2 variants (none: stage 1 only)")
    p.add_argument("--ablation-seeds", nargs="+", type=int, help="seeds for the ablations (default: --seeds)")
    p.add_argument("--source-iters", type=int, default=1500, help="stage 1 iterations (to a plateau)")
    p.add_argument("--source-iters-for", nargs="*", default=[], metavar="SHIFT=N",
                   help="stage-1 iterations of one shift instead of --source-iters (a shift that plateaus later)")
    p.add_argument("--curve-every", type=int, default=250, help="stage-1 target-val evaluation period")
    p.add_argument("--stage2-args", default="", help="extra train_gta2cs.py options for every stage-2 run")
    p.add_argument("--tag", default="before", help="name of this set of stage-2 runs (results/<tag>/)")
    p.add_argument("--work", default="/tmp/adaptation_study", help="datasets, runs and the per-run cache")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptation_study"))
    p.add_argument("--cached-only", action="store_true",
                   help="write the tables from the finished runs in --work, else from <out>/<tag>/results.json; "
                        "start no run (n/a for missing)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work, out = Path(a.work), Path(a.out) / a.tag
    extra = shlex.split(a.stage2_args)
    ablation_seeds = a.ablation_seeds if a.ablation_seeds is not None else a.seeds
    iters_for = parse_iters_for(p, a.source_iters_for)
    stored = None
    if a.cached_only:
        stored_file = out / "results.json"
        stored = json.loads(stored_file.read_text()) if stored_file.is_file() else {}
    stage1_info: dict = {}
    results: dict = {}
    for shift in a.shifts:
        stage1_info[shift], results[shift] = {}, {}
        for seed in a.seeds:
            info = stage1(shift, seed, work, iters_for.get(shift, a.source_iters), a.curve_every, stored)
            if info is None:
                print(f"{shift} seed {seed}: no stage-1 result cached", flush=True)
                continue
            stage1_info[shift][seed] = info
            print(f"{shift} seed {seed}: stage 1 {info['miou']:.2f} ({info['wall_s']:.0f} s)", flush=True)
            results[shift][seed] = {}
            for variant in a.variants:
                if variant != "full" and seed not in ablation_seeds:
                    continue
                r = stage2(shift, seed, work, variant, a.tag, info, extra, stored)
                if r is None:
                    continue
                results[shift][seed][variant] = r
                print(f"  {variant}: adapted {r['adapted']:.2f}"
                      + (f" control {r['control']:.2f}" if "control" in r else "")
                      + f" ({r['wall_s']:.0f} s)", flush=True)
    issue27 = tuple(v for v in ("decide", *ROUND_OPTIONS) if v in a.variants)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_compact(
        {"stage1": stage1_info, "stage2": results, "stage2_args": extra, "source_iters": a.source_iters,
         "source_iters_for": iters_for,
         "class_names": list(CITYSCAPES_NAMES), "machine": "2-core CPU container, torch 2.13.0 CPU, 1 thread"}),
        separators=(",", ":")))
    md = (f"# Adaptation study: {a.tag}\n\nCommand: `python -m benchmarks.study.adaptation_study "
          + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])) + "`\n\n"
          + f"Stage 1: {a.source_iters} iterations"
          + "".join(f", {k}: {v}" for k, v in iters_for.items()) + f"; stage-2 extra options: `{' '.join(extra) or '(none)'}`.\n\n"
          + tables(results, a.seeds, stage1_info)
          + "\n## Candidate fixes against the rule for a new default\n\nPer shift: candidate − same-budget "
          "control / candidate − paper default (± the paper default's seed spread: the standard deviation of its "
          "per-seed mIoU), means over the seeds. A candidate qualifies if on every shift the first is ≥ 0 and the "
          "second ≥ −spread.\n\n" + decision_table(results, a.seeds)
          + "\n\n## Issue 27: the options on top of the default against the rule for a new default\n\n"
          + means_table(results, a.seeds, stage1_info, issue27) + "\n\nPer shift: candidate − "
          "same-budget control (± the control's seed spread) / candidate − paper default (± its spread), means over "
          "the seeds. A candidate clears the rule if on every shift the first is ≥ −the control's spread and the "
          "second ≥ −the paper default's spread.\n\n" + default_rule_table(results, a.seeds, issue27)
          + "\n\n## Label-free signals against the true precision of the dynamic labels\n\nSpearman rank "
          "correlation over classes (at least " + str(MIN_SUPPORT) + " dynamic pixels in the round) between each "
          "signal and the dynamic labels' per-class precision (the run's --diagnostics), per round of the "
          "paper-default runs, mean over seeds × rounds; in brackets: cells with the expected sign (positive; "
          "`inflation`: negative) / cells.\n\n" + validation_table(results, a.seeds)
          + "\n\nThe agreement signals in absolute terms (signal − true precision, percentage points; same "
          "classes and rounds):\n\n" + agreement_error_table(results, a.seeds) + "\n")
    (out / "results.md").write_text(md)
    plot_curves(stage1_info, out / "stage1_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
