r"""What ``--contrast`` and each of its options cost per step of the DAFormer-class trainer (issue 33).

``python -m benchmarks.daformer_contrast_cost [--device cpu|cuda] [--arch A] [--crop C] [--amp bf16]`` builds one
run of ``examples/train_daformer.py`` per configuration: the recipe without the contrast and each configuration
of the study (:data:`benchmarks.study.daformer_contrast.CONFIGS`), all with ``--contrast-start 0`` so that every
timed step carries the contrast. It times the plain ``train_daformer.teacher_step`` of each, **round-robin** (one
step of each configuration in turn, so that a noisy neighbour slows them alike), and reports the median step and
its ratio to the recipe's, with the peak memory on CUDA. Data and sizes as :mod:`benchmarks.daformer_cost`
(default: the embedded demo, MiT-B0, 64² crops). Writes ``results/daformer_contrast_cost_<device>.json``.

The extra cost has three sources: FCL/BCL themselves (pooling, cosines, the EMAs: small), keeping the source
graph alive until the single backward (memory, not time), and for ``clean`` a third student forward and backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import train_daformer
from uda.daformer_options import parse_args
from uda.state import next_batch

from . import bench
from .daformer_cost import HERE, PartTimer, trainer_argv
from .study.daformer_contrast import CONFIGS

ARMS = {"recipe": [], **CONFIGS}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch")
    p.add_argument("--crop", type=int)
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="the tests' fixture, MiT-B0, 32 crops, 2 steps")
    p.add_argument("--out", type=Path, default=HERE / "results")
    given = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(given)
    args.mic, args.trainer_args = False, []
    if args.smoke:
        args.steps, args.warmup = 2, 1
    device = torch.device(args.device)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    peak: dict[str, float | None] = {}
    with tempfile.TemporaryDirectory(prefix="contrast_cost_", ignore_cleanup_errors=True) as scratch:
        work = Path(scratch)
        base, described = trainer_argv(args, device, work)
        runs = {}
        for arm, options in ARMS.items():
            targv = [*base, "--out", str(work / arm), "--contrast-start", "0", *options]
            if arm != "recipe" and "--contrast-dim" not in options and args.smoke:
                targv += ["--contrast-dim", "16"]
            run = train_daformer.setup(parse_args(targv))
            runs[arm] = (run, train_daformer.start(run))
        timer = PartTimer(device)
        try:
            for i in range(args.warmup + args.steps):
                for arm, (run, state) in runs.items():
                    train_daformer.schedule_lr(run, state["iteration"])
                    src, tgt = next_batch(run, state, run.source_stream), next_batch(run, state, run.target_stream)
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    _, ms = timer.call(train_daformer.teacher_step, run, state, src, tgt)
                    if device.type == "cuda":
                        peak[arm] = torch.cuda.max_memory_allocated(device) / 2**30
                    state["iteration"] += 1
                    state["step"] += 1
                    if i >= args.warmup:
                        times[arm].append(ms)
        finally:
            for run, _ in runs.values():
                run.source_stream.close()
                run.target_stream.close()
    recipe = statistics.median(times["recipe"])
    result = {arm: {"median_ms": statistics.median(t), "ratio": statistics.median(t) / recipe,
                    "min_ms": min(t), "max_ms": max(t), "peak_gib": peak.get(arm)} for arm, t in times.items()}
    report = {"machine": bench.machine_description(str(device)),
              "command": "python -m benchmarks.daformer_contrast_cost " + " ".join(given),
              "data": described, "arch": runs["recipe"][0].args.arch, "crop": runs["recipe"][0].args.crop,
              "amp": args.amp, "steps": args.steps, "warmup": args.warmup, "threads": torch.get_num_threads(),
              "arms": {arm: ARMS[arm] for arm in ARMS}, "result": result}
    m = report["machine"]
    where = ", ".join(str(m[k]) for k in ("device", "gpu", "cpu_model", "torch") if m.get(k))
    lines = [f"# --contrast cost per step ({where}, {torch.get_num_threads()} thread(s); {report['arch']}, crop {report['crop']}, "
             f"amp {args.amp}, {args.steps} steps round-robin)", "",
             "| configuration | options | median step (ms) | x recipe |" + (" peak (GiB) |" if peak else ""),
             "|---|---|---:|---:|" + ("---:|" if peak else "")]
    for arm, r in result.items():
        lines.append(f"| {arm} | `{' '.join(ARMS[arm]) or '(no --contrast)'}` | {r['median_ms']:.1f} | "
                     f"{r['ratio']:.2f} |" + (f" {r['peak_gib']:.2f} |" if peak else ""))
    print("\n".join(lines), flush=True)
    bench.write_report(report, args.out, f"daformer_contrast_cost_{device.type}{'_smoke' if args.smoke else ''}",
                       "daformer_contrast_cost")
    return report


if __name__ == "__main__":  # python -m benchmarks.daformer_contrast_cost
    main()
