r"""Does protocl's contrast help the DAFormer-class recipe? The evidence of issue 33, by issue 27's rule.

``python -m benchmarks.study.daformer_contrast choose`` trains, on each shift of :data:`SHIFTS` and seeds 0-2,
the recipe with its same-budget source-only control (``examples/train_daformer.py``, no ``--contrast``) and each
configuration of :data:`CONFIGS` (the recipe plus ``--contrast`` with those options, ``--no-control``), all at
:data:`BUDGET` (MiT-B0 from scratch, 64x64 crops, one thread: about 2 minutes a run on a CPU core).
:func:`choose` picks the configuration by :data:`RULE`, written before any run. ``report`` trains the recipe (with
its control) and the chosen configuration on fresh seeds 3-5: no run that took part in choosing is reused.
``tables`` prints both tables from the cache (``benchmarks/results/issue33/results.json``) without training;
``all`` does the three in order. A run already in the cache is never trained again.

The default-on rule (:func:`default_on`, issue 27's): the contrast is on by default only if on **every** shift of
the report, its mean mIoU is at least the recipe's mean minus the recipe's seed standard deviation, and at least
the control's mean minus the control's seed standard deviation.

Every run's data is a pure function of (shift, seed): ``demo`` is the embedded demo (GTA5 layout,
:func:`uda.demo.write_demo_dataset`); ``photo`` and ``clutter`` are the real-texture shifts of
:mod:`benchmarks.study.shifts` (an appearance shift and a content/geometry shift). None of them was used to set
any default of the contrast or of the recipe before this study; the toy scale may not carry over to MiT-B5 at 512².
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .adaptation_study import dataset  # the study's data: a pure function of (shift, seed)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results" / "issue33" / "results.json"
SHIFTS = ("demo", "photo", "clutter")
CHOOSE_SEEDS = (0, 1, 2)
REPORT_SEEDS = (3, 4, 5)
BUDGET = ["--arch", "mit-b0", "--iters", "200", "--warmup-iters", "10", "--lr", "6e-4", "--crop", "64",
          "--resize", "64", "--eval-size", "128x64", "--workers", "0", "--rcs-min-pixels", "12", "--threads", "1",
          "--log-every", "50", "--ckpt-every", "1000", "--contrast-start", "15", "--ema-momentum", "0.99"]
"""The demo's settings (uda.daformer_options.DEMO) at 200 iterations (a third of the demo's 600, so that a run
takes about 2 minutes); warm-up and the contrast's start about the demo's shares of the run (25/600, 45/600)."""
SOURCE_RESIZE = {"demo": 72, "photo": 64, "clutter": 64}  # each source's own short side: no resizing
CONFIGS = {
    "fused": ["--contrast"],
    "projection": ["--contrast", "--contrast-features", "projection"],
    "clean": ["--contrast", "--contrast-target", "clean"],
    "paper_labels": ["--contrast", "--contrast-labels", "class-balanced", "--hybrid-ce"],
}
"""The four configurations (at most four, issue 33), fixed before any run. ``fused``: the add-on as it comes (the
decoder's fused 256-d map, target features of the mixed image, static labels = the teacher's at >= 0.968, mixed
like the image; lambda_FCL = lambda_BCL = 0.1, tau 0.1). ``projection``: SePiCo's projection head in place of
the fused map. ``clean``: an extra student pass on the clean target crop for the target features. ``paper_labels``:
the paper's label pipeline, class-balanced static labels and the hybrid labels in the target CE."""
RULE = ("the configuration with the largest worst-shift gain: min over shifts of (mean over seeds 0-2 of its "
        "mIoU - the recipe's mean on the same seeds); ties: the cheaper (fewer options)")


def argv_for(shift: str, seed: int, arm: str, out: Path, gta: str, cs: str) -> list[str]:
    extra = ["--control"] if arm == "recipe" else ["--no-control", *CONFIGS[arm]]
    return [sys.executable, str(ROOT / "examples" / "train_daformer.py"), "--gta5-root", gta, "--cityscapes-root", cs,
            "--seed", str(seed), "--out", str(out), "--source-resize", str(SOURCE_RESIZE[shift]), *BUDGET, *extra]


def run_arm(shift: str, seed: int, arm: str, work: Path) -> dict:
    """One run (cached in its out folder's ``result.json``): adapted mIoU, the control's for ``recipe``."""
    out = work / "runs" / f"{shift}_seed{seed}" / arm
    cached = out / "result.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    gta, cs = dataset(shift, seed, work)
    argv = argv_for(shift, seed, arm, out, gta, cs)
    t0 = time.time()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shift} seed {seed} {arm} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    result = {"adapted": metrics["adapted"]["miou"], "wall_s": round(time.time() - t0, 1),
              "argv": [str(a).replace(f"{ROOT}/", "") for a in argv[1:]]}
    if "source_only" in metrics:
        result["source_only"] = metrics["source_only"]["miou"]
    cached.write_text(json.dumps(result))
    return result


def train(jobs: list[tuple[str, int, str]], work: Path, results: dict, workers: int) -> None:
    def one(job):
        shift, seed, arm = job
        result = run_arm(shift, seed, arm, work)
        print(f"{shift} seed {seed} {arm}: {result['adapted']:.2f}"
              + (f" (control {result['source_only']:.2f})" if "source_only" in result else "")
              + f" [{result['wall_s']:.0f} s]", flush=True)
        return job, result

    jobs = [(sh, s, arm) for sh, s, arm in jobs if arm not in results.get(sh, {}).get(str(s), {})]  # cached
    with ThreadPoolExecutor(workers) as pool:
        for (shift, seed, arm), result in pool.map(one, jobs):
            results.setdefault(shift, {}).setdefault(str(seed), {})[arm] = result
            save(results)


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def values(results: dict, shift: str, seeds, arm: str, key: str = "adapted") -> list[float]:
    source = "recipe" if key == "source_only" else arm
    return [results[shift][str(s)][source][key] for s in seeds]


def mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0


def choose(results: dict) -> tuple[str, dict]:
    """The configuration by :data:`RULE` on seeds 0-2, and each one's worst-shift gain."""
    gains = {}
    for arm in CONFIGS:
        gains[arm] = min(statistics.mean(values(results, s, CHOOSE_SEEDS, arm))
                         - statistics.mean(values(results, s, CHOOSE_SEEDS, "recipe")) for s in SHIFTS)
    best = max(CONFIGS, key=lambda arm: (round(gains[arm], 6), -len(CONFIGS[arm])))
    return best, gains


def default_on(results: dict, chosen: str) -> tuple[bool, list[str]]:
    """Issue 27's rule on the report seeds; returns (on, one line per shift)."""
    lines, on = [], True
    for shift in SHIFTS:
        c, _ = mean_std(values(results, shift, REPORT_SEEDS, chosen))
        r, r_sd = mean_std(values(results, shift, REPORT_SEEDS, "recipe"))
        k, k_sd = mean_std(values(results, shift, REPORT_SEEDS, "recipe", "source_only"))
        ok = c >= r - r_sd and c >= k - k_sd
        on &= ok
        lines.append(f"{shift}: {c:.2f} vs recipe {r:.2f} - {r_sd:.2f} and control {k:.2f} - {k_sd:.2f}: "
                     f"{'clears' if ok else 'fails'}")
    return on, lines


def fmt(v: list[float]) -> str:
    m, sd = mean_std(v)
    return f"{m:.2f} ± {sd:.2f}"


def tables(results: dict) -> str:
    out = [f"Choosing (seeds {', '.join(map(str, CHOOSE_SEEDS))}; mean ± seed std of target mIoU; MiT-B0 from scratch, "
           "200 iterations, 64² crops, CPU):", "",
           "| shift | source-only control | recipe | " + " | ".join(f"+ contrast: {a}" for a in CONFIGS) + " |",
           "|---|---|---|" + "---|" * len(CONFIGS)]
    for shift in SHIFTS:
        cells = [fmt(values(results, shift, CHOOSE_SEEDS, "recipe", "source_only")),
                 fmt(values(results, shift, CHOOSE_SEEDS, "recipe"))]
        cells += [fmt(values(results, shift, CHOOSE_SEEDS, a)) for a in CONFIGS]
        out.append(f"| {shift} | " + " | ".join(cells) + " |")
    chosen, gains = choose(results)
    out += ["", f"Rule: {RULE}.", "Worst-shift gain: " + ", ".join(f"{a} {g:+.2f}" for a, g in gains.items())
            + f". Chosen: **{chosen}**.", ""]
    if all(str(s) in results.get(sh, {}) and chosen in results[sh][str(s)] for sh in SHIFTS for s in REPORT_SEEDS):
        out += [f"Report (fresh seeds {', '.join(map(str, REPORT_SEEDS))}; no run of the choice reused):", "",
                f"| shift | source-only control | recipe | recipe + contrast ({chosen}) |", "|---|---|---|---|"]
        for shift in SHIFTS:
            out.append(f"| {shift} | {fmt(values(results, shift, REPORT_SEEDS, 'recipe', 'source_only'))} | "
                       f"{fmt(values(results, shift, REPORT_SEEDS, 'recipe'))} | "
                       f"{fmt(values(results, shift, REPORT_SEEDS, chosen))} |")
        on, lines = default_on(results, chosen)
        out += ["", "Default-on rule (issue 27): " + "; ".join(lines) + ".",
                f"**The contrast is {'on' if on else 'off'} by default.**"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("phase", choices=("choose", "report", "tables", "all"))
    p.add_argument("--work", default="/tmp/protocl_issue33", help="data and run folders (the cache of each run)")
    p.add_argument("--workers", type=int, default=2, help="runs at once (each on one thread)")
    a = p.parse_args(argv)
    work, results = Path(a.work), load()
    if a.phase in ("choose", "all"):
        jobs = [(sh, s, arm) for s in CHOOSE_SEEDS for sh in SHIFTS for arm in ("recipe", *CONFIGS)]
        train(jobs, work, results, a.workers)
    if a.phase in ("report", "all"):
        chosen, _ = choose(results)
        jobs = [(sh, s, arm) for s in REPORT_SEEDS for sh in SHIFTS for arm in ("recipe", chosen)]
        train(jobs, work, results, a.workers)
    print(tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
