r"""What each part of the DAFormer-class step costs (``examples/train_daformer.py``, issue 32): the mean-teacher
step of a run built as the script builds it, timed part by part.

    python -m benchmarks.daformer_cost --device cpu --steps 20 --warmup 5            # the embedded demo
    python -m benchmarks.daformer_cost --device cpu --steps 20 --warmup 5 --mic      # with MIC
    python -m benchmarks.daformer_cost --device cuda --arch mit-b5 --crop 512 --amp bf16 --steps 10 --warmup 3
    python -m benchmarks.daformer_cost --smoke                                       # the code path, seconds

The run: ``uda.daformer_options.parse_args`` -> ``train_daformer.setup`` -> ``train_daformer.start``, in a
temporary directory. Its data:

- by default (``--crop`` 64 or less) the embedded demo (128x72 source, 128x64 target images, written under the
  run's ``demo_data``; MiT-B0 from scratch, 64x64 crops, 2 + 2 crops per step);
- with a larger ``--crop`` C, a synthetic dataset at DAFormer's sizes scaled by C / 512 (the demo's scene
  generator: 8 source images of 1280x720, 8 + 2 target images of 1024x512 at C = 512), read with
  ``--source-resize 720 --resize 512 --eval-size 1024x512`` (scaled likewise) and ``--no-check-data``. Without
  ``--init`` the MiT starts from random weights: fine for timing (and the feature distance is off);
- ``--smoke``: the tests' tiny fixture (72x40 / 64x32 images, 32x32 crops, one thread, 2 steps).

Each round takes one source and one target batch from the run's streams (``uda.state.next_batch``, not timed) and
times on it, at the same iteration (so the same EMA momentum and the same random draws of
``uda.mean_teacher.step_generators``):

1. :func:`instrumented_step`: ``train_daformer.teacher_step`` copied with the same calls in the same order, each
   part timed on its own: ``ema_update`` (``teacher.ema_update_``), ``inputs`` (``step_generators``, the crops to
   the device, ``zero_grad``), ``source`` (``train_daformer.source_terms``: source CE forward + backward, plus the
   feature distance with ``--init``), ``teacher_labels`` (the teacher's forward, upsampling and
   ``teacher.pseudo_labels``), ``class_mix`` (``mix.class_mix_masks`` + ``mix.mix``), ``strong_transform``
   (``mix.strong_transform`` of the mixed crops), ``mixed_ce`` (the student on the mixed crops, CE forward +
   backward), ``mic`` (``--mic``: ``teacher.block_mask``, the masked crops' strong transform, CE forward +
   backward), ``optimizer_step`` (``train_daformer.step_optimizer``);
2. the plain ``train_daformer.teacher_step`` (uninstrumented: the step as the script runs it), then the loop's
   ``uda.state.watch`` after it (the non-finite guard, outside the step);
3. the control's ``train_daformer.source_step`` (the same-budget source-only run's step).

Clock: ``time.perf_counter`` around each timed call; on CUDA with ``torch.cuda.synchronize()`` before and after
each (so the parts' sum exceeds the plain step by the lost overlap of host and device). ``--warmup`` rounds are
left out, the median of ``--steps`` rounds is reported; a part's share is its median over the sum of the parts'
medians. Before timing, the instrumented step is checked against ``teacher_step`` from the same state (model,
teacher, optimizer, RNG): the same statistics and weights (bitwise on the CPU).

CUDA: the peak memory of one full ``teacher_step`` (``torch.cuda.max_memory_allocated``, reset before the step;
what a GPU needs for the recipe at ``--arch mit-b5 --crop 512 --amp bf16``). CPU: "n/a (CPU)".

Prints a Markdown table; writes ``<out>/daformer_cost_<device>[_mic][_smoke].json`` (default out:
``benchmarks/results``) with the machine, the settings and every median.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import train_daformer
from uda import mean_teacher, mix, teacher
from uda.daformer_options import parse_args
from uda.demo import write_demo_dataset
from uda.run import forward
from uda.state import next_batch, watch

from . import bench

HERE = Path(__file__).resolve().parent
PARTS = ("ema_update", "inputs", "source", "teacher_labels", "class_mix", "strong_transform", "mixed_ce", "mic",
         "optimizer_step")
DEMO_CROP = 64  # the demo's crop (uda.daformer_options.DEMO): larger crops need larger images than the demo's


class PartTimer:
    """``with timer("part"):`` adds the part's milliseconds to the current step (CUDA: synchronised around)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.current: dict[str, float] = {}

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def __call__(self, part: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.current[part] = self.current.get(part, 0.0) + 1e3 * (time.perf_counter() - start)

    def take(self) -> dict[str, float]:
        current, self.current = self.current, {}
        return current

    def call(self, fn, *args):
        """``fn(*args)`` and its milliseconds."""
        self.sync()
        start = time.perf_counter()
        out = fn(*args)
        self.sync()
        return out, 1e3 * (time.perf_counter() - start)


def instrumented_step(run, state: dict, src: dict, tgt: dict, part: PartTimer) -> dict:
    """``train_daformer.teacher_step`` with each part under ``part``: the same calls in the same order."""
    a, dev = run.args, run.device
    with part("ema_update"):
        teacher.ema_update_(run.teacher, run.model, state["iteration"], a.teacher_alpha)
    with part("inputs"):
        host, gen = mean_teacher.step_generators(a.seed, run.rank, state["step"], dev)
        x_s = src["image"].to(dev, non_blocking=True).float()
        y_s = src["label"].to(dev, non_blocking=True).long()
        x_t = tgt["image"].to(dev, non_blocking=True).float()
        run.optimizer.zero_grad(set_to_none=True)
    with part("source"):
        stats = train_daformer.source_terms(run, x_s, y_s)
    with part("teacher_labels"):
        y_t, w_t, _ = train_daformer.teacher_labels(run, x_t)
    x_m, y_m, w_m = x_t, y_t, w_t
    if not a.no_mix:
        with part("class_mix"):
            masks = mix.class_mix_masks(y_s, generator=gen)
            x_m, y_m, w_m = (mix.mix(masks, x_s, x_t), mix.mix(masks, y_s, y_t),
                             mix.mix(masks, torch.ones_like(w_t), w_t))
    strong = {"color_jitter_strength": a.jitter, "color_jitter_p": a.jitter_p if a.jitter > 0 else 1.0,
              "blur": not a.no_blur, "rng": host, **train_daformer.RAW}
    with part("strong_transform"):
        x_aug = mix.strong_transform(x_m, **strong)
    with part("mixed_ce"):
        ce_mix = mean_teacher.pixel_mean_ce(forward(run, run.net, x_aug)[0], y_m, w_m)
        train_daformer.backward(run, ce_mix)
        stats.update(ce_mix=ce_mix.detach(), pl_weight=w_t.amax())
    if a.mic:
        with part("mic"):
            keep = teacher.block_mask(x_t.shape[0], *x_t.shape[-2:], block=a.mic_block, ratio=a.mic_ratio,
                                      generator=gen, device=dev)
            masked = mix.mix(keep, mix.strong_transform(x_t, **strong), train_daformer.blank(run, x_t))
            mic = a.mic_weight * mean_teacher.pixel_mean_ce(forward(run, run.net, masked)[0], y_t, w_t)
            train_daformer.backward(run, mic)
            stats["mic"] = mic.detach()
    with part("optimizer_step"):
        train_daformer.step_optimizer(run)
    return stats


# ---------------------------------------------------------------------------------------------- the run
def data_options(args, work: Path) -> tuple[list[str], str]:
    """The trainer's data options for ``args`` and a description: the tests' fixture (``--smoke``), the demo
    (crops up to 64) or a synthetic dataset at DAFormer's sizes scaled by crop / 512."""
    if args.smoke:
        gta, cs = write_demo_dataset(work / "data", seed=0, source_images=4, target_train=4, target_val=2,
                                     source_size=(72, 40), target_size=(64, 32))
        return (["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--source-resize", "40", "--resize", "32",
                 "--eval-size", "64x32", "--rcs-min-pixels", "20", "--no-check-data"],
                "the tests' fixture (4 source images 72x40, 4 + 2 target images 64x32)")
    if args.crop is None or args.crop <= DEMO_CROP:
        return [], "the embedded demo (160 source images 128x72, 160 + 60 target images 128x64)"
    scale = args.crop / 512
    source, target = (round(1280 * scale), round(720 * scale)), (2 * args.crop, args.crop)
    gta, cs = write_demo_dataset(work / "data", seed=0, source_images=8, target_train=8, target_val=2,
                                 source_size=source, target_size=target)
    return (["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--source-resize", str(source[1]),
             "--resize", str(args.crop), "--eval-size", f"{target[0]}x{target[1]}",
             "--rcs-min-pixels", str(max(1, round(3000 * scale * scale))), "--no-check-data"],
            f"synthetic (the demo's scene generator: 8 source images {source[0]}x{source[1]}, 8 + 2 target images "
            f"{target[0]}x{target[1]})")


def trainer_argv(args, device: torch.device, work: Path) -> tuple[list[str], str]:
    data, described = data_options(args, work)
    argv = [*data, "--out", str(work / "run"), "--device", str(device), "--amp", args.amp]
    if args.arch or args.smoke:
        argv += ["--arch", args.arch or "mit-b0"]
    crop = args.crop or (32 if args.smoke else None)
    if crop:
        argv += ["--crop", str(crop)]
    if args.batch_size:
        argv += ["--batch-size", str(args.batch_size)]
    workers = args.workers if args.workers is not None else (2 if device.type == "cuda" else 0)
    argv += ["--workers", str(workers)]
    threads = args.threads or (1 if args.smoke else None)
    if threads:
        argv += ["--threads", str(threads)]
    if args.mic:  # MIC's 32-pixel blocks, or fewer pixels for the 8 x 8 blocks a small crop needs
        argv += ["--mic", "--mic-block", str(min(32, (crop or 64) // 8))]
    return argv + list(args.trainer_args), described


# ---------------------------------------------------------------------------------------------- the check
def snapshot(run) -> dict:
    return {"model": copy.deepcopy(run.model.state_dict()), "teacher": copy.deepcopy(run.teacher.state_dict()),
            "optimizer": copy.deepcopy(run.optimizer.state_dict()), "scaler": copy.deepcopy(run.scaler.state_dict()),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if run.device.type == "cuda" else None}


def restore(run, saved: dict) -> None:
    run.model.load_state_dict(saved["model"])
    run.teacher.load_state_dict(saved["teacher"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(saved["cuda_rng"])


def check_equivalence(run, state: dict, src: dict, tgt: dict) -> dict:
    """The plain step and :func:`instrumented_step` from one state: their statistics and weights compared."""
    saved = snapshot(run)
    plain = {k: v.detach().float().clone() for k, v in train_daformer.teacher_step(run, state, src, tgt).items()}
    plain_weights = [p.detach().clone() for p in run.model.parameters()]
    restore(run, saved)
    mine = instrumented_step(run, state, src, tgt, PartTimer(run.device))
    mine = {k: v.detach().float() for k, v in mine.items()}
    stats_diff = max((float((plain[k] - mine[k]).abs().max()) for k in plain if k in mine), default=0.0)
    weights = [q.detach() for q in run.model.parameters()]
    weights_diff = max(float((p - q).abs().max()) for p, q in zip(plain_weights, weights))
    identical = (plain.keys() == mine.keys() and all(torch.equal(plain[k], mine[k]) for k in plain)
                 and all(torch.equal(p, q) for p, q in zip(plain_weights, weights)))
    del saved, plain_weights, weights
    return {"same_statistics": sorted(plain) == sorted(mine), "identical": identical,
            "max_abs_diff_statistics": stats_diff, "max_abs_diff_weights": weights_diff}


# ---------------------------------------------------------------------------------------------- timing
def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "times_ms": [round(t, 4) for t in times]}


def measure(run, state: dict, steps: int, warmup: int) -> dict:
    """``warmup`` + ``steps`` rounds of (instrumented step, plain step + watch, control step) on one batch each."""
    timer = PartTimer(run.device)
    parts: dict[str, list[float]] = {}
    reference: dict[str, list[float]] = {"instrumented_step": [], "teacher_step": [], "watch": [],
                                         "source_step": []}
    for i in range(warmup + steps):
        train_daformer.schedule_lr(run, state["iteration"])
        src, tgt = next_batch(run, state, run.source_stream), next_batch(run, state, run.target_stream)
        instrumented_step(run, state, src, tgt, timer)
        step_parts = timer.take()
        stats, teacher_ms = timer.call(train_daformer.teacher_step, run, state, src, tgt)
        _, watch_ms = timer.call(watch, run, state, stats)
        _, source_ms = timer.call(train_daformer.source_step, run, state, src)
        state["iteration"] += 1
        state["step"] += 1
        if i < warmup:
            continue
        for name, ms in step_parts.items():
            parts.setdefault(name, []).append(ms)
        reference["instrumented_step"].append(sum(step_parts.values()))
        reference["teacher_step"].append(teacher_ms)
        reference["watch"].append(watch_ms)
        reference["source_step"].append(source_ms)
    total = sum(statistics.median(t) for t in parts.values())
    result = {"parts": {}, "reference": {k: summary(v) for k, v in reference.items()}}
    for name in PARTS:
        if name in parts:
            result["parts"][name] = {**summary(parts[name]),
                                     "share_pct": 100 * statistics.median(parts[name]) / total}
    result["sum_of_part_medians_ms"] = total
    return result


def peak_memory(run, state: dict) -> dict:
    """CUDA: the peak allocated memory of one full ``teacher_step`` (reset before; the resident state too)."""
    if run.device.type != "cuda":
        return {"teacher_step": "n/a (CPU)"}
    src, tgt = next_batch(run, state, run.source_stream), next_batch(run, state, run.target_stream)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_daformer.teacher_step(run, state, src, tgt)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"teacher_step_peak_mib": peak / 2**20, "resident_before_step_mib": resident / 2**20,
            "reserved_mib": torch.cuda.memory_reserved() / 2**20}


def markdown(report: dict) -> str:
    m, s, r = report["machine"], report["settings"], report["result"]
    lines = ["# Cost of the DAFormer-class step, part by part", "",
             f"Machine: {m.get('gpu', 'no GPU')} / {m.get('cpu_model')} ({m.get('cpu_count')} CPUs, torch threads "
             f"{m.get('torch_threads')}), torch {m['torch']}, {m['platform']}; device {m['device']}"
             f"{' (smoke run: not a figure to quote)' if report['smoke'] else ''}.",
             f"Command: `{report['command']}`", "",
             f"Setting: {s['arch']}, crops {s['crop']}, batch {s['batch']} + {s['batch']}, amp {s['amp']}, "
             f"MIC {'on' if s['mic'] else 'off'}, feature distance {'on' if s['feature_distance'] else 'off'}; "
             f"data: {s['data']}. Median of {s['steps']} rounds after {s['warmup']} ({s['clock']}).", "",
             "| part | median ms | share of the step |", "| --- | ---: | ---: |"]
    for name in PARTS:
        e = r["parts"].get(name)
        lines.append(f"| {name} | {e['median_ms']:.2f} | {e['share_pct']:.1f} % |" if e else f"| {name} | off | |")
    ref = r["reference"]
    lines += [f"| sum of the part medians | {r['sum_of_part_medians_ms']:.2f} | 100 % |",
              f"| instrumented step (median of per-step sums) | {ref['instrumented_step']['median_ms']:.2f} | |",
              f"| `train_daformer.teacher_step` (plain) | {ref['teacher_step']['median_ms']:.2f} | |",
              f"| `uda.state.watch` after it (loop, not in the step) | {ref['watch']['median_ms']:.2f} | |",
              f"| `train_daformer.source_step` (the control's step) | {ref['source_step']['median_ms']:.2f} | |", ""]
    mem = report["peak_memory"]
    if "teacher_step_peak_mib" in mem:
        lines.append(f"Peak memory of one `teacher_step`: {mem['teacher_step_peak_mib']:.0f} MiB allocated "
                     f"({mem['resident_before_step_mib']:.0f} MiB resident before the step; "
                     f"{mem['reserved_mib']:.0f} MiB reserved).")
    else:
        lines.append(f"Peak memory: {mem['teacher_step']}.")
    eq = report["equivalence"]
    lines.append(f"Instrumented step vs `teacher_step` from one state: identical {eq['identical']} (max abs diff: "
                 f"statistics {eq['max_abs_diff_statistics']:.3g}, weights {eq['max_abs_diff_weights']:.3g}).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Arguments after -- go to the trainer (uda.daformer_options).")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--arch", help="the trainer's --arch (default: the demo's mit-b0 with demo data, else mit-b5)")
    p.add_argument("--crop", type=int, help="crop size; above 64: a synthetic dataset at DAFormer's sizes x crop/512")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--mic", action="store_true", help="build the run with --mic (the mic part is timed)")
    p.add_argument("--batch-size", type=int, help="source and target crops per step (the trainer's default: 2)")
    p.add_argument("--steps", type=int, help="timed rounds (20; smoke 2)")
    p.add_argument("--warmup", type=int, help="rounds left out first (5; smoke 1)")
    p.add_argument("--workers", type=int, help="DataLoader workers (cuda 2, cpu 0)")
    p.add_argument("--threads", type=int, help="torch threads (the trainer's --threads; default: the demo's, "
                                                 "torch's choice; smoke 1). On a busy machine 1 avoids OpenMP "
                                                 "oversubscription (a 2-thread team sharing 2 loaded cores stalls)")
    p.add_argument("--smoke", action="store_true", help="tiny fixture, MiT-B0, 32 crops, 2 steps: the code path")
    p.add_argument("--out", type=Path, default=HERE / "results", help="where the JSON goes")
    given = list(sys.argv[1:] if argv is None else argv)
    split = given.index("--") if "--" in given else len(given)
    args = p.parse_args(given[:split])
    args.trainer_args = given[split + 1:]
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("expected a CUDA device for --device cuda, got torch.cuda.is_available() == False")
    steps = args.steps or (2 if args.smoke else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 5)
    with tempfile.TemporaryDirectory(prefix="daformer_cost_", ignore_cleanup_errors=True) as scratch:
        work = Path(scratch)
        targv, described = trainer_argv(args, device, work)
        run = train_daformer.setup(parse_args(targv))
        try:
            state = train_daformer.start(run)
            a = run.args
            src, tgt = next_batch(run, state, run.source_stream), next_batch(run, state, run.target_stream)
            equivalence = check_equivalence(run, state, src, tgt)
            del src, tgt
            result = measure(run, state, steps, warmup)
            memory = peak_memory(run, state)
        finally:
            run.source_stream.close()
            run.target_stream.close()
    report = {
        "machine": bench.machine_description(str(device)),
        "command": "python -m benchmarks.daformer_cost " + " ".join(given),
        "smoke": args.smoke,
        "settings": {"arch": a.arch, "crop": a.crop, "batch": a.batch_size, "amp": a.amp, "mic": a.mic,
                     "feature_distance": run.imnet is not None, "no_mix": a.no_mix, "data": described,
                     "steps": steps, "warmup": warmup, "workers": a.workers, "threads": torch.get_num_threads(),
                     "clock": "perf_counter, torch.cuda.synchronize() around each part" if device.type == "cuda"
                     else "perf_counter (wall clock)", "trainer_argv": targv},
        "result": result, "peak_memory": memory, "equivalence": equivalence,
    }
    text = markdown(report)
    print(text, flush=True)
    bench.write_report(report, args.out, f"daformer_cost_{device.type}{'_mic' if a.mic else ''}"
                       f"{'_smoke' if args.smoke else ''}", "daformer_cost")
    return report


if __name__ == "__main__":  # python -m benchmarks.daformer_cost
    main()
