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

The study builds every run as the pipeline does (``gta2cs.options.parse_args`` + ``train_gta2cs.setup``) and
calls the pipeline's functions; nothing is subclassed or patched.

Per-class label diagnostics, against target ground truth (a diagnostic: never trained on), all with the
pipeline's ``gta2cs.diagnostics`` (one implementation, one class-mean rule): for the static labels from the
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
from gta2cs import diagnostics, options
from gta2cs.data import CLASS_NAMES, cityscapes_files, read_label
from gta2cs.evaluate import evaluate
from gta2cs.synthetic import write_demo_dataset
from PIL import Image

from .gates import target_labels_hook
from .shifts import SHIFTS, write_shift

ROOT = Path(__file__).resolve().parents[2]
K = len(CLASS_NAMES)
DEMOS = {"demo": "gta5", "synthia": "synthia"}  # the embedded demo, with its source in the GTA5 / SYNTHIA layout
SHIFT_NAMES = (*DEMOS, *SHIFTS)
# variant -> (pipeline options, dynamic-label gate of the target CE or None)
VARIANTS = {
    "full": (["--control"], None),
    "gated": (["--no-control"], "prediction"),
    "threshold_0.95": (["--no-control", "--threshold", "0.95"], None),
    "agreement": (["--no-control"], "agreement"),
    "either": (["--no-control"], "either"),
    "no_contrastive": (["--no-control", "--no-contrastive"], None),
    "no_dynamic": (["--no-control", "--no-dynamic"], None),
    "no_calibration": (["--no-control", "--no-calibration"], None),
    "static_only": (["--no-control", "--no-dynamic", "--no-contrastive"], None),
}


def source_flag(shift: str) -> str:
    return "--synthia-root" if shift == "synthia" else "--gta5-root"


def static_png_counts(run_dir: Path, cityscapes_root: str, round_index: int) -> torch.Tensor:
    """:func:`gta2cs.diagnostics.class_counts` of the written static labels of one round against target train
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
             "--source-checkpoint", source["checkpoint"], "--diagnostics"] + flags + extra)
    t0 = time.time()
    run = train_gta2cs.setup(options.parse_args(argv))
    step = train_gta2cs.adapt_step
    if gate is not None:
        step = functools.partial(train_gta2cs.adapt_step, target_labels=target_labels_hook(gate, K))
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
    result["labels_train_crops"] = metrics.get("diagnostics", [])  # per round: the pipeline's --diagnostics
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
        rows: dict[str, list] = {"source-only (stage 1, plateau)": [stage1_info[shift][s]["miou"] for s in seeds]}
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
            summary.append(f"| {shift} | {fmt(_mean(rows['source-only (stage 1, plateau)']))} | {fmt(_mean(control))} "
                           f"| {fmt(_mean(adapted))} | {_mean(adapted) - _mean(control):+.2f} |")
        walls = [per_seed[s][v]["wall_s"] for s in seeds for v in per_seed[s]]
        s1 = [stage1_info[shift][s]["wall_s"] for s in seeds]
        lines += ["", f"Wall time: stage 1 {min(s1):.0f}–{max(s1):.0f} s per seed; stage-2 runs "
                  f"{min(walls):.0f}–{max(walls):.0f} s each (the full run includes its control)." if walls else "", ""]
    return "\n".join(["Means over the seeds:", "", *summary, "", *lines])


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
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", nargs="+", default=list(SHIFT_NAMES), choices=SHIFT_NAMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--ablation-seeds", nargs="+", type=int, help="seeds for the ablations (default: --seeds)")
    p.add_argument("--source-iters", type=int, default=1500, help="stage 1 iterations (to a plateau)")
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
    stored = None
    if a.cached_only:
        stored_file = out / "results.json"
        stored = json.loads(stored_file.read_text()) if stored_file.is_file() else {}
    stage1_info: dict = {}
    results: dict = {}
    for shift in a.shifts:
        stage1_info[shift], results[shift] = {}, {}
        for seed in a.seeds:
            info = stage1(shift, seed, work, a.source_iters, a.curve_every, stored)
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
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_compact(
        {"stage1": stage1_info, "stage2": results, "stage2_args": extra, "source_iters": a.source_iters,
         "class_names": list(CLASS_NAMES), "machine": "2-core CPU container, torch 2.13.0 CPU, 1 thread"}),
        separators=(",", ":")))
    md = (f"# Adaptation study: {a.tag}\n\nCommand: `python -m benchmarks.study.adaptation_study "
          + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])) + "`\n\n"
          + f"Stage 1: {a.source_iters} iterations; stage-2 extra options: `{' '.join(extra) or '(none)'}`.\n\n"
          + tables(results, a.seeds, stage1_info))
    (out / "results.md").write_text(md)
    plot_curves(stage1_info, out / "stage1_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
