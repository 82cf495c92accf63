r"""Wall time of one stage-2 round on the demo under each of issue 27's round options (the cost the rule for a
new default asks for).

From the adaptation study's stage-1 model of the demo shift (``--work``, seed ``--seed``), for each option: the
round's static labels (timed apart), then ``--round-iters`` training steps of round 0 (the loop's
``adapt_round`` without its end: evaluation and decisions are the same for every option), and, for the
fallbacks, the same budget as the undone round's fallback steps. One thread, the tiny CNN, the study's settings.

    python -m benchmarks.study.round_cost            # writes benchmarks/results/adaptation_study/round_cost.md
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch
import train_gta2cs
from uda import decisions, options, report
from uda.state import next_batch

from .adaptation_study import ROOT, dataset

OPTIONS = {
    "the default step": [],
    "`--reliability-weight`": ["--reliability-weight"],
    "`--rectify`": ["--rectify"],
    "`--proto-resize purity`": ["--proto-resize", "purity"],
}
FALLBACKS = ("source", "static", "drop-flagged")


def build(work: Path, seed: int, out: Path, extra: list[str]) -> train_gta2cs.Run:
    gta, cs = dataset("demo", seed, work)
    checkpoint = work / "runs" / f"demo_seed{seed}" / "stage1_1500" / "source_only.pt"
    argv = ["--gta5-root", gta, "--cityscapes-root", cs, "--arch", "tiny", "--seed", str(seed), "--out", str(out),
            "--source-checkpoint", str(checkpoint), "--source-iters", "1500", "--no-control", "--no-diagnostics",
            "--round-decisions", "off", *extra]
    return train_gta2cs.setup(options.parse_args(argv))


def time_round(run: train_gta2cs.Run, fallback: str | None = None) -> tuple[float, float]:
    """(static labels s, steps s) of round 0: ``--round-iters`` steps of ``adapt_round``, or with ``fallback`` as
    many of that fallback's steps (the loop's step functions: ``source_step``, or ``adapt_step`` inside
    :func:`uda.decisions.fallback_terms`, after one adapted step whose signals the drop-flagged fallback reads)."""
    state = train_gta2cs.start(run)
    t0 = time.perf_counter()
    state["thresholds"] = train_gta2cs.make_static_labels(run, 0)
    t1 = time.perf_counter()
    labels_s, n = t1 - t0, run.args.round_iters
    if fallback is None:
        train_gta2cs.adapt_round(run, state, until=n - 1)  # (until: stops before the round's end and evaluation)
        train_gta2cs.adapt_step(run, next_batch(run, state, run.source_stream),
                                next_batch(run, state, run.target_stream))
        return labels_s, time.perf_counter() - t1
    train_gta2cs.adapt_round(run, state, until=1)
    report.round_signals(run, state)
    run.args.fallback = fallback
    t1 = time.perf_counter()
    with decisions.fallback_terms(run, state) if fallback != "source" else contextlib.nullcontext({}) as extra:
        for _ in range(n):
            src = next_batch(run, state, run.source_stream)
            if fallback == "source":
                train_gta2cs.source_step(run, src)
            else:
                train_gta2cs.adapt_step(run, src, next_batch(run, state, run.target_stream), **extra)
    return labels_s, time.perf_counter() - t1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/adaptation_study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-iters", type=int, default=200, help="iterations of the timed round (the study's 200)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adaptation_study" / "round_cost.md"))
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    work, rows = Path(a.work), []
    scratch = work / "runs" / f"demo_seed{a.seed}" / "round_cost"
    for name, extra in OPTIONS.items():
        run = build(work, a.seed, scratch / name.strip("`-").replace(" ", "_"), [*extra, "--round-iters",
                                                                                 str(a.round_iters)])
        labels_s, steps_s = time_round(run)
        rows.append((f"adapted round, {name}", labels_s, steps_s))
        print(rows[-1], flush=True)
    for fallback in FALLBACKS:
        run = build(work, a.seed, scratch / f"fallback_{fallback}", ["--round-iters", str(a.round_iters)])
        labels_s, steps_s = time_round(run, fallback)
        rows.append((f"undone round's fallback, `--fallback {fallback}`", labels_s, steps_s))
        print(rows[-1], flush=True)
    base = rows[0][2]
    lines = [f"| round (demo seed {a.seed}, tiny CNN, 1 thread, {a.round_iters} iterations) | static labels (s) | "
             "steps (s) | steps vs default |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {labels:.1f} | {steps:.1f} | {steps / base:.2f}× |" for name, labels, steps in rows]
    text = ("# Wall time of one stage-2 round per option (issue 27)\n\nCommand: `python -m benchmarks.study.round_cost"
            + "".join(f" {x}" for x in (argv if argv is not None else sys.argv[1:])) + "`\n\n" + "\n".join(lines)
            + "\n")
    Path(a.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
