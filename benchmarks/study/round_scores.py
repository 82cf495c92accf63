r"""Does a label-free score of the model follow the true target mIoU from round to round? (issue 27, part 1)

For each shift of the adaptation study (:data:`benchmarks.study.adaptation_study.SHIFT_NAMES`) and seed: the
study's dataset and stage-1 source model (its cache under ``--work`` is reused, else trained as the study does),
then the paper default's stage 2 (tiny defaults: 3 rounds × 200 iterations) round by round with the pipeline's
functions (``train_gta2cs.setup``/``start``/``make_static_labels``/``adapt_round``; nothing patched). At the
start of stage 2 (the source model) and at the end of every round it records every candidate of
:func:`uda.score.target_scores` on a fixed unlabelled subset (the first ``--subset`` target-train images, resized
as for the static labels; no target label read), the run's label-free training signals of the round
(:mod:`uda.signals`, class means; rounds only) and the true target-val mIoU.

Per candidate it reports the Spearman rank correlation between the change of the score and the change of the
true mIoU from one model to the next (start → round 0 → round 1 → round 2; pooled over shifts, seeds and rounds,
and per shift), the share of those changes whose sign the score gets right, and the regret of picking the
model by the score (true mIoU of the highest-scored of the four models minus the best one's; mean over runs).

Every finished run is cached as JSON under ``<work>/round_scores/`` (an interrupted study continues);
``--cached-only`` rebuilds the tables from that cache, else from the stored ``results.json``.

    python -m benchmarks.study.round_scores                       # every shift, seeds 0 1 2
    python -m benchmarks.study.round_scores --seeds 0             # seed 0 only
    python -m benchmarks.study.round_scores --cached-only         # the tables, no run
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import train_gta2cs
from uda import options
from uda.scoring import batches
from uda import score as uda_score
from uda.loading import PseudoLabelSet

from .adaptation_study import SHIFT_NAMES, dataset, parse_iters_for, source_flag, spearman, stage1

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("start", "round 0", "round 1", "round 2")
TRAIN_SIGNALS = ("static_agreement", "prediction_agreement", "hybrid_prediction_agreement", "margin",
                 "separation", "inflation")  # uda.signals; inflation enters negated (higher = better)
CANDIDATES = (*uda_score.SCORES, *uda_score.EMA_SCORES, "combined", *(f"train_{n}" for n in TRAIN_SIGNALS))
BIG = 1.0  # mIoU points: a change of the true mIoU the decisions must get right (val noise is below it)
MACHINE = "the project's 2-core CPU container (shared with other jobs), torch 2.13.0 CPU, 1 thread, nice 19"


def run_one(shift: str, seed: int, work: Path, source_iters: int, subset: int, stored: dict | None = None
            ) -> dict | None:
    cached = work / "round_scores" / f"{shift}_seed{seed}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    if stored is not None:  # --cached-only
        return stored.get("runs", {}).get(f"{shift}_seed{seed}")
    t0 = time.time()
    info = stage1(shift, seed, work, source_iters, 250)  # the study's cache, or trained as the study does
    gta, cs = dataset(shift, seed, work)
    out = work / "runs" / f"{shift}_seed{seed}" / "round_scores"
    shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again
    argv = [source_flag(shift), gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out",
            str(out), "--source-checkpoint", info["checkpoint"], "--source-iters", str(source_iters),
            "--no-control", "--round-decisions", "off", "--threads", "1"]
    t1 = time.time()
    run = train_gta2cs.setup(options.parse_args(argv))
    state = train_gta2cs.start(run)
    subset_set = PseudoLabelSet(run.target_train[:subset], resize=run.args.resize)
    entries = []

    def record(stage: str, miou: float, signals: dict | None, round_s: float | None) -> None:
        ema = run.contrast.target_ema
        given = bool(ema.initialized.any())
        t = time.time()
        scores = uda_score.target_scores(run.model, batches(subset_set, 8), run.device, num_classes=run.num_classes,
                                         prototypes=ema.prototypes if given else None,
                                         prototypes_valid=ema.initialized if given else None)
        score_s = time.time() - t
        for name in uda_score.EMA_SCORES:
            scores.setdefault(name, math.nan)
        for name in TRAIN_SIGNALS:
            value = math.nan if signals is None else signals[f"class_mean_{name}"]
            scores[f"train_{name}"] = -value if name == "inflation" else value
        entries.append({"stage": stage, "miou": miou, "scores": scores, "score_s": score_s,
                        "score_s_per_image": score_s / max(1.0, scores["images"]), "round_s": round_s})
        run.log(f"{stage}: target val mIoU {miou:.2f}; label-free scores "
                + " ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "images") + f" ({score_s:.2f} s)")

    record("start", state["metrics"]["source_only"]["miou"], None, None)
    for r in range(run.args.rounds):
        t = time.time()
        state["thresholds"] = train_gta2cs.make_static_labels(run, r)
        train_gta2cs.adapt_round(run, state)
        record(f"round {r}", state["metrics"]["rounds"][-1]["miou"], state["metrics"]["signals"][-1],
               time.time() - t)
    result = {"shift": shift, "seed": seed, "argv": argv, "subset": subset, "entries": entries,
              "stage1_s": info["wall_s"], "stage1_reused": t1 - t0 < 5, "stage2_s": time.time() - t1,
              "source_iters": source_iters}
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------------------------- analysis
def candidate_values(result: dict, name: str) -> list[float]:
    """The candidate's value for each of the run's models (start, rounds); ``combined`` over the four."""
    rows = [e["scores"] for e in result["entries"]]
    if name == "combined":
        return uda_score.combine(rows)
    return [float(r.get(name, math.nan)) if r.get(name) is not None else math.nan for r in rows]


def deltas(result: dict, name: str) -> list[tuple[float, float]]:
    """(score change, true mIoU change) from each model to the next; ``combined``: the vote of the pair."""
    miou = [e["miou"] for e in result["entries"]]
    rows = [e["scores"] for e in result["entries"]]
    out = []
    for i in range(len(rows) - 1):
        if name == "combined":
            a, b = uda_score.combine([rows[i], rows[i + 1]])
        else:
            a, b = (float(rows[i].get(name) if rows[i].get(name) is not None else math.nan),
                    float(rows[i + 1].get(name) if rows[i + 1].get(name) is not None else math.nan))
        if not (math.isnan(a) or math.isnan(b)):
            out.append((b - a, miou[i + 1] - miou[i]))
    return out


def regret(result: dict, name: str) -> float:
    """True mIoU of the model the candidate picks (highest value; first on ties) minus the best model's."""
    miou = [e["miou"] for e in result["entries"]]
    values = candidate_values(result, name)
    defined = [i for i, v in enumerate(values) if not math.isnan(v)]
    if not defined:
        return math.nan
    pick = max(defined, key=lambda i: (values[i], -i))
    return miou[pick] - max(miou)


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else math.nan


def _pct(flags: list[bool]) -> str:
    return f"{100 * sum(flags) / len(flags):.0f} % ({sum(flags)}/{len(flags)})" if flags else "n/a"


def _f(v: float, fmt: str = "+.2f") -> str:
    return "n/a" if v is None or math.isnan(v) else format(v, fmt)


def tables(runs: list[dict], shifts: list[str]) -> tuple[str, str, dict]:
    """The correlation table, the regret table (Markdown) and their numbers."""
    summary: dict = {}
    head = (f"| candidate | Spearman, pooled (pairs) | sign right | falls ≥ {BIG:g} caught | "
            f"rises ≥ {BIG:g} kept | " + " | ".join(shifts) + " |",
            "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(shifts))
    corr = list(head)
    for name in CANDIDATES:
        pairs = [p for r in runs for p in deltas(r, name)]
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
        right = [(a > 0) == (b > 0) for a, b in pairs if a != 0 and b != 0]
        per_shift = {}
        for s in shifts:
            shift_pairs = [p for r in runs if r["shift"] == s for p in deltas(r, name)]
            per_shift[s] = spearman([a for a, _ in shift_pairs], [b for _, b in shift_pairs])
        falls = [a < 0 for a, b in pairs if b <= -BIG]  # a harmful round the score flags (it falls too)
        rises = [a > 0 for a, b in pairs if b >= BIG]  # a helpful round the score keeps (it rises too)
        summary[name] = {"spearman": rho, "pairs": len(pairs), "sign_right": _share(right),
                         "falls_caught": _share(falls), "falls": len(falls), "rises_kept": _share(rises),
                         "rises": len(rises), "spearman_per_shift": per_shift}
        corr.append(f"| `{name}` | {_f(rho)} ({len(pairs)}) | {_pct(right)} | {_pct(falls)} | {_pct(rises)} | "
                    + " | ".join(_f(per_shift[s]) for s in shifts) + " |")
    reg = ["| pick the model by | mean regret, all runs | " + " | ".join(shifts) + " |",
           "| --- | ---: |" + " ---: |" * len(shifts)]
    rules = {**{f"`{n}`": (lambda r, n=n: regret(r, n)) for n in CANDIDATES},
             "the last round (the paper default)": lambda r: r["entries"][-1]["miou"] - max(e["miou"] for e in
                                                                                            r["entries"]),
             "the source model (never adapt)": lambda r: r["entries"][0]["miou"] - max(e["miou"] for e in
                                                                                      r["entries"])}
    for label, fn in rules.items():
        values = [fn(r) for r in runs]
        per_shift = {s: _mean([fn(r) for r in runs if r["shift"] == s]) for s in shifts}
        summary.setdefault(label.strip("`"), {}).update(regret=_mean(values), regret_per_shift=per_shift)
        reg.append(f"| {label} | {_f(_mean(values))} | " + " | ".join(_f(per_shift[s]) for s in shifts) + " |")
    return "\n".join(corr), "\n".join(reg), summary


def picked(result: dict, name: str) -> float:
    """True mIoU of the model the candidate picks (as :func:`regret`)."""
    return regret(result, name) + max(e["miou"] for e in result["entries"])


def control_table(runs: list[dict], shifts: list[str], controls: dict) -> str:
    """Per shift, mean over the seeds with a control: the picked model's mIoU minus the same-budget control's
    (the adaptation study's runs from the same stage-1 model), and minus the paper default's (the last round)."""
    names = [n for n in CANDIDATES if not n.startswith(("train_", "ema_"))]
    lines = ["| pick the model by | " + " | ".join(shifts) + " | mean |", "| --- |" + " ---: |" * (len(shifts) + 1)]
    rows = {f"`{n}`": (lambda r, n=n: picked(r, n)) for n in names}
    rows["the last round (the paper default)"] = lambda r: r["entries"][-1]["miou"]
    rows["the source model (never adapt)"] = lambda r: r["entries"][0]["miou"]
    for label, fn in rows.items():
        cells, all_diffs = [], []
        for s in shifts:
            diffs = [(fn(r) - controls[s][r["seed"]], fn(r) - r["entries"][-1]["miou"]) for r in runs
                     if r["shift"] == s and r["seed"] in controls.get(s, {})]
            all_diffs += diffs
            cells.append(f"{_f(_mean([a for a, _ in diffs]))} / {_f(_mean([b for _, b in diffs]))}" if diffs
                         else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_f(_mean([a for a, _ in all_diffs]))} / "
                     f"{_f(_mean([b for _, b in all_diffs]))} |")
    return "\n".join(lines)


def read_controls(path: Path) -> dict:
    """``{shift: {seed: control mIoU}}`` from an adaptation-study ``results.json`` (empty if absent)."""
    if not path.is_file():
        return {}
    stage2 = json.loads(path.read_text()).get("stage2", {})
    return {shift: {int(seed): v["full"]["control"] for seed, v in per_seed.items()
                    if v.get("full", {}).get("control") is not None} for shift, per_seed in stage2.items()}


def per_run_table(runs: list[dict]) -> str:
    lines = ["| run | " + " | ".join(f"{s} mIoU" for s in STAGES) + " | best | stage-2 wall (s) | score s/image |",
             "| --- |" + " ---: |" * (len(STAGES) + 3)]
    for r in runs:
        miou = [e["miou"] for e in r["entries"]]
        per_image = _mean([e["score_s_per_image"] for e in r["entries"]])
        lines.append(f"| {r['shift']} seed {r['seed']} | " + " | ".join(f"{m:.2f}" for m in miou)
                     + f" | {STAGES[miou.index(max(miou))]} | {r['stage2_s']:.0f} | {per_image:.4f} |")
    return "\n".join(lines)


def _compact(value):
    if isinstance(value, float):
        return None if math.isnan(value) else value  # full precision: --cached-only rebuilds the same tables
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_compact(v) for v in value]
    return value


def _restore_nan(value):
    if value is None:
        return math.nan
    if isinstance(value, dict):
        return {k: (_restore_nan(v) if k not in ("argv",) else v) for k, v in value.items()}
    if isinstance(value, list):
        return [_restore_nan(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shifts", nargs="+", default=list(SHIFT_NAMES), choices=SHIFT_NAMES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--source-iters", type=int, default=1500, help="stage-1 iterations (the study's v3: 1500)")
    p.add_argument("--source-iters-for", nargs="*", default=["shape=3000"], metavar="SHIFT=N",
                   help="stage-1 iterations of one shift instead of --source-iters (v3: shape=3000)")
    p.add_argument("--subset", type=int, default=64, help="target-train images scored (the first N)")
    p.add_argument("--work", default="/tmp/adaptation_study", help="the study's datasets, runs and caches")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "round_scores"))
    p.add_argument("--cached-only", action="store_true", help="the tables from the cache, start no run")
    p.add_argument("--controls", default=str(ROOT / "benchmarks" / "results" / "adaptation_study" / "v3" /
                                             "results.json"),
                   help="the adaptation study's results.json with the same-budget controls of the same stage-1 "
                        "models (the v3 study: same stage-1 iterations and seeds)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work, out = Path(a.work), Path(a.out)
    iters_for = parse_iters_for(p, a.source_iters_for)
    stored = None
    if a.cached_only:
        stored_file = out / "results.json"
        stored = _restore_nan(json.loads(stored_file.read_text())) if stored_file.is_file() else {}
    runs = []
    for seed in a.seeds:  # seed by seed: every shift of seed 0 first
        for shift in a.shifts:
            r = run_one(shift, seed, work, iters_for.get(shift, a.source_iters), a.subset, stored)
            if r is None:
                print(f"{shift} seed {seed}: not run", flush=True)
                continue
            runs.append(r)
            print(f"{shift} seed {seed}: mIoU " + " -> ".join(f"{e['miou']:.2f}" for e in r["entries"])
                  + f" (stage 2 {r['stage2_s']:.0f} s)", flush=True)
    shifts = [s for s in a.shifts if any(r["shift"] == s for r in runs)]
    corr, reg, summary = tables(runs, shifts)
    given = [x for x in (argv if argv is not None else sys.argv[1:]) if x != "--cached-only"]
    command = " ".join(["python -m benchmarks.study.round_scores", *given])
    controls = read_controls(Path(a.controls))
    shown = Path(a.controls).relative_to(ROOT) if Path(a.controls).is_relative_to(ROOT) else a.controls
    with_control = any(r["seed"] in controls.get(r["shift"], {}) for r in runs)
    control_md = (control_table(runs, shifts, controls) if with_control else
                  f"(no same-budget control of these shifts and seeds in `{shown}`)")
    walls = [r["stage2_s"] for r in runs]
    per_image = [e["score_s_per_image"] for r in runs for e in r["entries"]]
    md = (f"# Label-free scores against the true target mIoU, round by round (issue 27)\n\nCommand: `{command}` "
          "(add `--cached-only` to rebuild these tables from the per-run cache or this folder's results.json). "
          f"Machine: {MACHINE}. Runs: {len(runs)} (shifts {', '.join(shifts)}; seeds "
          f"{sorted({r['seed'] for r in runs})}); the paper default (tiny, 3 rounds × 200 iterations) from the "
          f"study's stage-1 model ({a.source_iters} iterations"
          + "".join(f", {k}: {v}" for k, v in iters_for.items()) + f"); scores on the first {a.subset} "
          "target-train images.\n\n"
          + (f"Stage-2 wall time per run (3 rounds, 4 scorings, evaluations): {min(walls):.0f}–{max(walls):.0f} "
             f"s; scoring cost {1000 * min(per_image):.1f}–{1000 * max(per_image):.1f} ms per image.\n\n"
             if runs else "")
          + "## Change of the score against the change of the true mIoU\n\nSpearman over every consecutive "
          "pair of models (start → round 0 → round 1 → round 2) of every run; `sign right`: the share of pairs "
          "(both changes non-zero) where the score moves the way the mIoU does; `falls caught`: of the pairs "
          f"where the true mIoU fell by at least {BIG:g}, the share where the score fell too (a round a decision "
          f"must undo); `rises kept`: of those where it rose by at least {BIG:g}, the share where the score rose "
          "(a round a decision must keep); `combined`: the pair's vote "
          "(`uda.score.combine` of the two models); `train_*` (the round's training signals) exist for rounds "
          "only.\n\n" + corr + "\n\n## Regret of picking the model by the score\n\nTrue target-val mIoU of the "
          "highest-scored of the run's models (start = the source model, and each round's end) minus the best "
          "one's, mean over runs (0 = always the best; `train_*` pick among the rounds only).\n\n" + reg
          + "\n\n## The picked model against the same-budget control\n\nPer shift, mean over the seeds that have "
          "a control: the picked model's true mIoU minus the same-budget control's / minus the paper default's "
          f"(the last round). The controls: `{shown}` "
          "(the same stage-1 models; their paper-default rounds equal these runs'). Picking among the rounds "
          "already trained is not yet a round decision (which would restore a round's start and spend its "
          "budget otherwise): it shows what the score alone can recover.\n\n" + control_md
          + "\n\n## Per run (target val mIoU %)\n\n" + per_run_table(runs) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_compact(
        {"runs": {f"{r['shift']}_seed{r['seed']}": r for r in runs}, "summary": summary, "command": command,
         "machine": MACHINE, "controls": {k: {str(sd): v for sd, v in c.items()} for k, c in controls.items()},
         "subset": a.subset, "source_iters": a.source_iters, "source_iters_for": iters_for}),
        indent=None, separators=(",", ":")))
    (out / "results.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
