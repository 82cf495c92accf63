r"""Does adaptation beat source-only training given the same iterations, beyond the demo? (issue 11)

For each shift (the embedded demo and the two shifts of ``examples/gta2cs/shifts.py``) and each seed:

1. write the dataset (seeded like the demo: the data seed is the run seed);
2. train the source model once, to a plateau (``--source-iters``, evaluated on target val every
   ``--curve-every`` iterations for the plateau curve), and keep ``source_only.pt``;
3. from that one checkpoint (``--source-checkpoint``), run stage 2 for every variant:

   * ``full``: the method, with the same-budget control (``--control``: source-only continued for the same
     stage-2 iterations with the same lr schedule) in the same run;
   * ``no_contrastive`` (``--no-contrastive``), ``no_dynamic`` (``--no-dynamic``), ``no_calibration``
     (``--no-calibration``), ``static_only`` (``--no-dynamic --no-contrastive``: plain self-training on the
     static labels with the pipeline's CE + entropy terms).

Per-class label diagnostics, against target ground truth (a diagnostic: never trained on): for the static labels
from the PNGs written under ``<run>/pseudo_labels/round_XX`` over the whole target train split, and for the
static / dynamic / hybrid labels of the training crops of every stage-2 step (the trainer's own
``--diagnostics``, per class and round, stored in each run's metrics.json).

Writes ``<out>/<tag>/results.json`` and ``results.md`` (per shift, per seed) and ``stage1_curves.png``; every
finished run is cached as JSON under ``--work`` so an interrupted study continues where it stopped.

    python benchmarks/adaptation_study.py --tag before                 # the full table (about 40 min, 1 thread)
    python benchmarks/adaptation_study.py --tag fix --stage2-args "--lr 1e-3"   # stage-2 options for every run
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from gta2cs.data import CLASS_NAMES, IGNORE, cityscapes_files, read_label
from gta2cs.evaluate import evaluate
from gta2cs.shifts import SHIFTS, write_shift
from gta2cs.synthetic import write_demo_dataset
from gta2cs.trainer import Trainer
from train_gta2cs import build_parser, resolve

K = len(CLASS_NAMES)
DEMOS = {"demo": "gta5", "synthia": "synthia"}  # the embedded demo, with its source in the GTA5 / SYNTHIA layout
SHIFT_NAMES = (*DEMOS, *SHIFTS)


def source_flag(shift: str) -> str:
    return "--synthia-root" if shift == "synthia" else "--gta5-root"
VARIANTS = {
    "full": ["--control"],
    "gated": ["--no-control", "--gate-dynamic", "prediction"],
    "threshold_0.95": ["--no-control", "--threshold", "0.95"],
    "agreement": ["--no-control", "--gate-dynamic", "agreement"],
    "either": ["--no-control", "--gate-dynamic", "either"],
    "no_contrastive": ["--no-control", "--no-contrastive"],
    "no_dynamic": ["--no-control", "--no-dynamic"],
    "no_calibration": ["--no-control", "--no-calibration"],
    "static_only": ["--no-control", "--no-dynamic", "--no-contrastive"],
}


class StudyTrainer(Trainer):
    """The pipeline's trainer plus one study hook: the stage-1 target-val curve."""

    def __init__(self, args, *, curve_every: int = 0) -> None:
        super().__init__(args)
        self.curve_every = curve_every
        self.curve: list[tuple[int, float]] = []

    def save(self, name: str = "checkpoint.pt") -> None:
        s = self.state
        if self.curve_every and s.stage == "source" and 0 < s.iteration < self.args.source_iters:
            result = evaluate(self.model, self.val_loader, self.num_classes, self.device, subsets=self.subsets,
                              amp_dtype=self.amp_dtype)  # the trainer's protocol (SYNTHIA: mIoU16)
            self.curve.append((s.iteration, result["miou"]))
        super().save(name)


def class_diagnostics(confusion: np.ndarray) -> dict:
    """Per class k (rows = ground truth, columns = label, last column = unlabelled): coverage = labelled share
    of the class's pixels, precision = correct share of the pixels labelled k, share = k's share of the labelled
    pixels (against its share of the ground truth). Class means: coverage over the classes in the ground truth,
    precision over the classes that were labelled (a spurious class counts with precision 0)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    gt_count = confusion.sum(1)
    labelled = confusion[:, :K]
    present = gt_count > 0
    cov = np.where(present, labelled.sum(1) / np.maximum(gt_count, 1), np.nan)
    predicted = labelled.sum(0)
    prec = np.where(predicted > 0, np.diag(labelled) / np.maximum(predicted, 1), np.nan)
    share = predicted / max(1.0, predicted.sum())
    gt_share = gt_count / max(1.0, gt_count.sum())
    pixel_cov = labelled.sum() / max(1.0, gt_count.sum())
    pixel_prec = np.trace(labelled) / max(1.0, labelled.sum())
    return {
        "coverage": [100 * v for v in cov.tolist()], "precision": [100 * v for v in prec.tolist()],
        "share": [100 * v for v in share.tolist()], "gt_share": [100 * v for v in gt_share.tolist()],
        "coverage_mean": 100 * float(np.nanmean(cov[present])),
        "precision_mean": 100 * float(np.nanmean(prec)) if (predicted > 0).any() else math.nan,
        "pixel_coverage": 100 * pixel_cov, "pixel_precision": 100 * pixel_prec,
    }


def static_png_confusion(run_dir: Path, cityscapes_root: str, round_index: int) -> np.ndarray:
    """Confusion of the written static labels of one round against target train ground truth."""
    folder = run_dir / "pseudo_labels" / f"round_{round_index:02d}"
    confusion = np.zeros((K, K + 1), np.int64)
    for sample in cityscapes_files(cityscapes_root, "train"):
        static = np.asarray(Image.open(folder / f"{sample.name}.png")).astype(np.int64)
        gt = read_label(sample.label, static.shape[::-1]).astype(np.int64)
        known = gt != IGNORE
        column = np.where(static == IGNORE, K, static)
        confusion += np.bincount((gt * (K + 1) + column)[known], minlength=K * (K + 1)).reshape(K, K + 1)
    return confusion


def dataset(shift: str, seed: int, work: Path) -> tuple[str, str]:
    root = work / "data" / f"{shift}_seed{seed}"
    if shift in DEMOS:
        gta, cs = write_demo_dataset(root, seed=seed, source=DEMOS[shift])
    else:
        gta, cs = write_shift(shift, root, seed=seed)
    return str(gta), str(cs)


def trainer_args(argv: list[str]):
    return resolve(build_parser().parse_args(argv))


def stage1(shift: str, seed: int, work: Path, source_iters: int, curve_every: int) -> dict:
    out = work / "runs" / f"{shift}_seed{seed}" / f"stage1_{source_iters}"
    cached = out / "stage1.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    gta, cs = dataset(shift, seed, work)
    argv = [source_flag(shift), gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out", str(out),
            "--source-iters", str(source_iters), "--ckpt-every", str(curve_every), "--no-control"]
    t0 = time.time()
    trainer = StudyTrainer(trainer_args(argv), curve_every=curve_every)
    trainer.train_source()
    result = {"checkpoint": str(out / "source_only.pt"), "miou": trainer.state.metrics["source_only"]["miou"],
              "iou": trainer.state.metrics["source_only"]["iou"],
              "curve": trainer.curve + [(source_iters, trainer.state.metrics["source_only"]["miou"])],
              "wall_s": time.time() - t0, "argv": argv}
    cached.write_text(json.dumps(result))
    return result


def stage2(shift: str, seed: int, work: Path, variant: str, tag: str, source: dict, extra: list[str],
           cached_only: bool = False) -> dict | None:
    out = work / "runs" / f"{shift}_seed{seed}" / f"{tag}_{variant}"
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if cached_only:
        return None
    gta, cs = dataset(shift, seed, work)
    argv = ([source_flag(shift), gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out", str(out),
             "--source-checkpoint", source["checkpoint"], "--diagnostics"] + VARIANTS[variant] + extra)
    t0 = time.time()
    args = trainer_args(argv)
    trainer = StudyTrainer(args)
    trainer.start_from_source(args.source_checkpoint)
    trainer.run()
    wall = time.time() - t0
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"argv": argv, "wall_s": wall, "source_only": metrics["source_only"]["miou"],
              "adapted": metrics["adapted"]["miou"], "adapted_iou": metrics["adapted"]["iou"],
              "rounds": [r["miou"] for r in metrics["rounds"]]}
    if "source_only_continued" in metrics:
        result["control"] = metrics["source_only_continued"]["miou"]
        result["control_iou"] = metrics["source_only_continued"]["iou"]
    result["labels_train_crops"] = metrics.get("diagnostics", [])  # per round: the trainer's --diagnostics
    result["static_png"] = {f"round{r}": class_diagnostics(static_png_confusion(out, cs, r))
                            for r in range(args.rounds)}
    losses = [line for line in (out / "log.txt").read_text().splitlines() if "ce_tgt" in line]
    result["last_loss_line"] = losses[-1] if losses else ""
    cached.write_text(json.dumps(result))
    return result


def fmt(v: float) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


LABELS = {
    "full": "**adapted (full method)**", "gated": "`--gate-dynamic prediction`",
    "threshold_0.95": "`--threshold 0.95`", "agreement": "`--gate-dynamic agreement`",
    "either": "`--gate-dynamic either`",
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
                   help="write the tables from the finished runs in --work; start no stage-2 run (n/a for missing)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work, out = Path(a.work), Path(a.out) / a.tag
    extra = shlex.split(a.stage2_args)
    ablation_seeds = a.ablation_seeds if a.ablation_seeds is not None else a.seeds
    stage1_info: dict = {}
    results: dict = {}
    for shift in a.shifts:
        stage1_info[shift], results[shift] = {}, {}
        for seed in a.seeds:
            info = stage1(shift, seed, work, a.source_iters, a.curve_every)
            stage1_info[shift][seed] = info
            print(f"{shift} seed {seed}: stage 1 {info['miou']:.2f} ({info['wall_s']:.0f} s)", flush=True)
            results[shift][seed] = {}
            for variant in a.variants:
                if variant != "full" and seed not in ablation_seeds:
                    continue
                r = stage2(shift, seed, work, variant, a.tag, info, extra, a.cached_only)
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
    md = (f"# Adaptation study: {a.tag}\n\nCommand: `python benchmarks/adaptation_study.py "
          + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])) + "`\n\n"
          + f"Stage 1: {a.source_iters} iterations; stage-2 extra options: `{' '.join(extra) or '(none)'}`.\n\n"
          + tables(results, a.seeds, stage1_info))
    (out / "results.md").write_text(md)
    plot_curves(stage1_info, out / "stage1_curves.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
