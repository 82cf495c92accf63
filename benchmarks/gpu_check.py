r"""GPU evidence for the reference pipeline: the real loop of ``examples/train_gta2cs.py`` on DeepLab-V2
ResNet-101 (one command, under 8 minutes on an H100; ``bash benchmarks/gpu_check.sh`` runs it first):

    python -m benchmarks.gpu_check --device cuda
    python -m benchmarks.gpu_check --smoke          # the code path on the CPU, seconds

Sections (each records its result or its error in the JSON, so one failure does not hide the others):

1. ``pipeline``: the pipeline's own functions (``setup``, ``start``, ``train_source``, ``end_source``,
   ``make_static_labels``, ``adapt_round``; a run built as ``train_gta2cs.main`` builds it), with the step timer
   handed in as their ``step_context``, train DeepLab-V2 R101 from random weights on a synthetic dataset written
   to a temporary directory (the demo's scene generator, source and target images upscaled to short side 850 by
   the loader, 2 + 2 random crops of 730²) for ``--source-iters`` stage-1 steps and one round of
   ``--round-iters`` stage-2 steps, with ``--sync-debug`` (every step but the first of a stage or round runs under
   ``torch.cuda.set_sync_debug_mode("error")``: any host sync raises and fails the configuration), in fp32 and
   bf16 autocast, with the full method (``adapt_step``) and without protocl (:func:`no_protocl_step`, passed
   as ``adapt_round``'s step: the same CE + entropy on the static labels, the orchestrator not called). Per configuration: median GPU time of a
   step (CUDA events around each step, the first steps of a stage left out), stage-2 throughput over the whole
   round (events from the first timed step to the last: includes any wait for data), peak GPU memory of the
   stage-2 steps, and the static-label pass (images/s over the target train split: two passes over the images,
   PNG writing included).
2. ``protocl_step``: protocl's orchestrator alone at the release's shapes under sync-debug "error", and captured
   in a CUDA graph, replayed on new inputs, compared with eager and timed.

``--smoke`` runs section 1 end to end with the tiny CNN, tiny crops and a few steps (on the CPU by default): the
code path of the GPU run, checked by the test suite. Figures of a smoke run say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import train_gta2cs
from uda import options
from uda.demo import write_demo_dataset

import protocl

from . import bench

HERE = Path(__file__).resolve().parent
VARIANTS = ("full", "no_protocl")
PRECISIONS = {"fp32": "none", "bf16": "bf16"}


class StepTimer:
    """A ``step_context`` for the pipeline's loops: CUDA events around every step and the running peak memory, no sync inside."""

    def __init__(self, device: torch.device, skip: int) -> None:
        self.device, self.skip = device, skip
        self.events: dict[str, list] = {"source": [], "adapt": []}
        self.wall: dict[str, list] = {"source": [], "adapt": []}
        self.peak_bytes = 0

    @contextlib.contextmanager
    def __call__(self, kind: str, checked: bool):
        cuda = self.device.type == "cuda"
        if cuda:
            if kind == "adapt" and not self.events["adapt"]:
                torch.cuda.reset_peak_memory_stats()  # host-side allocator statistics: no sync
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        yield
        self.wall[kind].append(1e3 * (time.perf_counter() - t0))
        if cuda:
            end.record()
            self.events[kind].append((start, end))
            if kind == "adapt":
                self.peak_bytes = torch.cuda.max_memory_allocated()

    def summary(self, kind: str) -> dict:
        """Median GPU ms per step (CUDA events) or host ms (CPU) after ``skip`` warm-up steps; span throughput."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            pairs = self.events[kind][self.skip:]
            times = [start.elapsed_time(end) for start, end in pairs]
            span_ms = pairs[0][0].elapsed_time(pairs[-1][1]) if pairs else float("nan")
            clock = "cuda events"
        else:
            times = self.wall[kind][self.skip:]
            span_ms = sum(times)
            clock = "host wall clock"
        if not times:
            return {"steps_timed": 0, "clock": clock}
        return {"steps_timed": len(times), "median_ms": statistics.median(times), "min_ms": min(times),
                "steps_per_s": len(times) / (span_ms / 1e3), "clock": clock}


def write_data(root: Path, smoke: bool) -> tuple[Path, Path]:
    """Synthetic GTA5/Cityscapes-layout data: small renders, upscaled by the loader to short side 850."""
    if smoke:
        return write_demo_dataset(root, seed=0, source_images=4, target_train=4, target_val=2, source_size=(72, 40),
                                  target_size=(64, 32))
    return write_demo_dataset(root, seed=0, source_images=16, target_train=16, target_val=4,
                              source_size=(320, 180), target_size=(320, 160))


def no_protocl_step(run: train_gta2cs.Run, src: dict, tgt: dict) -> tuple[dict, None]:
    """The baseline step without protocl: the pipeline's CE(source) + 0.3·CE(target, static) + entropy terms,
    no orchestrator (the cost of protocl is the difference to ``train_gta2cs.adapt_step``)."""
    b = src["image"].shape[0]
    y_s = src["label"].to(run.device, non_blocking=True).long()
    y_f = tgt["static"].to(run.device, non_blocking=True).long()
    images = torch.cat([src["image"].to(run.device, non_blocking=True), tgt["image"].to(run.device, non_blocking=True)])
    logits, _ = train_gta2cs.forward(run, run.net, images)
    up = F.interpolate(logits, size=y_s.shape[-2:], mode="bilinear", align_corners=False)
    ce_src, ce_tgt = train_gta2cs.safe_cross_entropy(up[:b], y_s), train_gta2cs.safe_cross_entropy(up[b:], y_f)
    ent = protocl.entropy_loss(up[:b]) + 0.3 * protocl.entropy_loss(up[b:])
    train_gta2cs.optimize(run, ce_src + 0.3 * ce_tgt + 0.4 * ent)
    stats = {"ce_src": ce_src.detach(), "ce_tgt": ce_tgt.detach(), "ent": ent.detach()}
    for name in ("static", "dynamic", "hybrid"):  # (the log point's coverage columns: the static labels)
        stats[f"cov_{name}"] = torch.count_nonzero(y_f != protocl.IGNORE_INDEX) * (100.0 / y_f.numel())
    return stats, None


def pipeline_run(argv: list[str], device: torch.device, skip: int, variant: str = "full") -> dict:
    """One configuration: stage 1 and one round of stage 2 through the pipeline's functions, every step timed,
    the static-label pass timed."""
    run = train_gta2cs.setup(options.parse_args(argv))
    timer = StepTimer(device, skip)
    step = train_gta2cs.adapt_step if variant == "full" else no_protocl_step
    t0 = time.perf_counter()
    try:
        state = train_gta2cs.start(run)
        train_gta2cs.train_source(run, state, step_context=timer)
        train_gta2cs.end_source(run, state)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_static = time.perf_counter()
        state["thresholds"] = train_gta2cs.make_static_labels(run, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t_static
        train_gta2cs.adapt_round(run, state, step=step, step_context=timer)
    finally:
        protocl.set_value_checks(True)
    result = {"wall_s": time.perf_counter() - t0, "stage1": timer.summary("source"),
              "stage2": timer.summary("adapt"),
              "static_labels": {"images": len(run.target_train), "seconds": seconds,
                                "images_per_s": len(run.target_train) / seconds},
              "target_miou_after_round": state["metrics"].get("adapted", {}).get("miou")}
    if device.type == "cuda":
        result["stage2_peak_memory_mib"] = timer.peak_bytes / 2**20
    del run, state  # (DataLoader workers and GPU memory)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def pipeline_section(device: torch.device, smoke: bool, source_iters: int, round_iters: int, workers: int,
                     budget_s: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        return _pipeline_configurations(Path(work), device, smoke, source_iters, round_iters, workers, budget_s)


def _pipeline_configurations(work: Path, device: torch.device, smoke: bool, source_iters: int, round_iters: int,
                             workers: int, budget_s: float) -> dict:
    t_start = time.perf_counter()
    source_root, cityscapes_root = write_data(work / "data", smoke)
    crop, resize, eval_size = (32, 40, "64x32") if smoke else (730, 850, "1460x730")
    shape = ["--arch", "tiny" if smoke else "deeplabv2", "--batch-size", "2", "--crop", str(crop), "--resize",
             str(resize), "--eval-size", eval_size] + (["--threads", "1"] if smoke else [])
    skip = 1 if smoke else 5
    result = {"setting": {"arch": "tiny" if smoke else "deeplabv2 R101, random init", "crop": crop,
                          "batch": "2 source + 2 target", "source_iters": source_iters,
                          "round_iters": round_iters, "warmup_steps_left_out": skip, "workers": workers}}
    for precision, amp in PRECISIONS.items():
        for variant in VARIANTS:
            name = f"{precision}_{variant}"
            if time.perf_counter() - t_start > budget_s:
                result[name] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
                continue
            argv = ["--gta5-root", str(source_root), "--cityscapes-root", str(cityscapes_root), *shape,
                    "--device", str(device), "--amp", amp, "--sync-debug", "--out", str(work / name),
                    "--source-iters", str(source_iters), "--rounds", "1", "--round-iters", str(round_iters),
                    "--log-every", str(max(1, round_iters // 2)), "--ckpt-every", str(10**9),
                    "--workers", str(workers), "--no-control", "--no-diagnostics"]
            try:
                result[name] = pipeline_run(argv, device, skip, variant)
            except Exception as exc:  # noqa: BLE001 - a failing configuration (e.g. a host sync) is a result too
                result[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20)}
            print(f"[gpu_check] pipeline {name}: {_short(result[name])}", flush=True)
    for precision in PRECISIONS:
        full, base = result.get(f"{precision}_full", {}), result.get(f"{precision}_no_protocl", {})
        try:
            result[f"{precision}_protocl_share_of_step_pct"] = 100 * (
                full["stage2"]["median_ms"] / base["stage2"]["median_ms"] - 1)
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    return result


def _short(entry: dict) -> str:
    if "error" in entry or "skipped" in entry:
        return entry.get("error") or entry["skipped"]
    mem = entry.get("stage2_peak_memory_mib")
    return (f"stage 2 median {entry['stage2']['median_ms']:.1f} ms/step ({entry['stage2']['clock']}), "
            f"{entry['stage2']['steps_per_s']:.2f} steps/s" + (f", peak {mem:.0f} MiB" if mem is not None else "")
            + f"; static labels {entry['static_labels'].get('images_per_s', float('nan')):.2f} images/s")


def protocl_step_section(device: torch.device) -> dict:
    r"""protocl's orchestrator alone at the release's shapes: sync-debug "error", then a CUDA graph."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA"}
    case = bench.Case("release", 2, 76, 92, 730)
    inputs = bench.make_inputs(case, "cuda")
    contrast = protocl.BidirectionalContrast(case.num_classes, case.dim).to(device)
    result = {}
    protocl.set_value_checks(False)
    try:
        _protocl_step(contrast, inputs)  # warm-up outside debug mode (lazy init, cuBLAS handles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                _protocl_step(contrast, inputs)
            result["sync_debug"] = "no host sync"
        except RuntimeError as exc:
            result["sync_debug"] = f"host sync: {exc}\n{traceback.format_exc(limit=12)}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    finally:
        protocl.set_value_checks(True)
    result["cuda_graph"] = cuda_graph_check()
    return result


def timed(fn, device: str, *, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def _protocl_step(contrast, inputs):
    inputs["source_features"].grad = None
    inputs["target_features"].grad = None
    out = contrast(inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                   inputs["static_labels"])
    out.loss.backward()
    return out


def cuda_graph_check(device: str = "cuda") -> dict:
    r"""Capture the protocl step in a CUDA graph; replay on new inputs; compare with eager; time the replay."""
    case = bench.Case("release", 2, 76, 92, 730)
    static = bench.make_inputs(case, device, seed=0)
    fresh = bench.make_inputs(case, device, seed=1)
    module = protocl.BidirectionalContrast(case.num_classes, case.dim).to(device)
    protocl.set_value_checks(False)
    try:
        # warm up on a side stream (required before capture), then snapshot the module for the eager reference
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                _protocl_step(module, static)
        torch.cuda.current_stream().wait_stream(side)
        static["source_features"].grad = None
        static["target_features"].grad = None
        reference = copy.deepcopy(module)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = module(static["source_features"], static["source_labels"], static["target_features"],
                               static["static_labels"])
            graph_out.loss.backward()
        # the capture does not run the work: replay on the fresh inputs and compare with eager on the snapshot
        with torch.no_grad():
            for key in ("source_features", "target_features", "source_labels", "static_labels"):
                static[key].copy_(fresh[key])
        static["source_features"].grad.zero_()
        static["target_features"].grad.zero_()
        graph.replay()
        torch.cuda.synchronize()
        eager = _protocl_step(reference, fresh)
        result = {
            "loss_graph": float(graph_out.loss), "loss_eager": float(eager.loss),
            "grad_max_abs_diff": float((static["target_features"].grad - fresh["target_features"].grad).abs().max()),
            "ema_max_abs_diff": float((module.source_ema.prototypes - reference.source_ema.prototypes).abs().max()),
            "labels_equal": bool((graph_out.target_labels == eager.target_labels).all()),
        }
        times = timed(graph.replay, device, warmup=3, repeats=50)
        eager_times = timed(lambda: _protocl_step(reference, fresh), device, warmup=3, repeats=50)
        result["replay_median_ms"] = statistics.median(times)
        result["eager_median_ms"] = statistics.median(eager_times)
    finally:
        protocl.set_value_checks(True)
    print(f"[gpu_check] cuda graph: {result}", flush=True)
    return result


def markdown(report: dict) -> str:
    """The pipeline figures as a Markdown table (with the machine)."""
    m = report["machine"]
    lines = ["# GPU check of the reference pipeline", "",
             f"Machine: {m.get('gpu', 'no GPU')} / {m.get('cpu_model')} ({m.get('cpu_count')} CPUs), torch {m['torch']}, "
             f"device {m['device']}{' (smoke run: tiny network, not a GPU figure)' if report['smoke'] else ''}.",
             f"Command: `{report['command']}`", ""]
    p = report.get("pipeline", {})
    if "error" in p:
        return "\n".join(lines + [f"pipeline failed: {p['error']}"])
    setting = p.get("setting", {})
    lines += [f"Setting: {setting}", "",
              "| configuration | stage-2 step, median ms | stage-2 steps/s | stage-1 step, median ms | "
              "stage-2 peak MiB | static labels, images/s | sync-debug |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for precision in PRECISIONS:
        for variant in VARIANTS:
            e = p.get(f"{precision}_{variant}", {})
            if "error" in e or "skipped" in e:
                lines.append(f"| {precision} {variant} | {(e.get('error') or e.get('skipped'))[:80]} | | | | | |")
                continue
            if not e:
                continue
            mem = e.get("stage2_peak_memory_mib")
            lines.append(
                f"| {precision} {variant} | {e['stage2']['median_ms']:.1f} | {e['stage2']['steps_per_s']:.2f} | "
                f"{e['stage1']['median_ms']:.1f} | {'n/a' if mem is None else f'{mem:.0f}'} | "
                f"{e['static_labels'].get('images_per_s', float('nan')):.2f} | "
                f"{'no sync raised' if m['device'].startswith('cuda') else 'not applicable on CPU'} |")
    for precision in PRECISIONS:
        key = f"{precision}_protocl_share_of_step_pct"
        if key in p:
            lines.append(f"\n{precision}: the full step takes {p[key]:+.1f}% against the step without protocl.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda (default) or cpu (default for --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny network, tiny crops, a few steps: checks the code path")
    p.add_argument("--source-iters", type=int, default=None, help="stage-1 steps per configuration (30; smoke 3)")
    p.add_argument("--round-iters", type=int, default=None, help="stage-2 steps per configuration (100; smoke 4)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (6; smoke 0)")
    p.add_argument("--budget-s", type=float, default=330.0, help="skip the remaining configurations after this")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("expected a CUDA device for --device cuda, got torch.cuda.is_available() == False")
    source_iters = args.source_iters or (3 if args.smoke else 30)
    round_iters = args.round_iters or (4 if args.smoke else 100)
    workers = args.workers if args.workers is not None else (0 if args.smoke else 6)
    report = {"machine": bench.machine_description(str(device)), "command": " ".join(sys.argv),
              "smoke": args.smoke}
    sections = (
        ("pipeline", lambda: pipeline_section(device, args.smoke, source_iters, round_iters, workers, args.budget_s)),
        ("protocl_step", lambda: protocl_step_section(device)),
    )
    for name, fn in sections:
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a failing section is a result too; keep going
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=15)}
            print(f"[gpu_check] {name} failed: {exc}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{device.type}{'_smoke' if args.smoke else ''}"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1, default=str))
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(f"[gpu_check] wrote {args.out / stem}.json and .md", flush=True)
    return report


if __name__ == "__main__":  # python -m benchmarks.gpu_check
    main()
