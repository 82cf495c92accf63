r"""Side-by-side benchmark: protocl's adaptation step and losses against the release's loops.

Run ``python benchmarks/bench_step.py [--device cpu|cuda] [--compile] [--quick] [--out DIR]``.

What is timed (forward + backward, median of interleaved repeats, all in one process so that machine load hits
every implementation alike):

- ``release_step``: :class:`release_baseline.ReleaseStep`, a whole step in the release's loop style;
- ``release_loss``: :func:`release_baseline.release_losses`, FCL + BCL exactly as the release computes them;
- ``protocl_step``: ``protocl.BidirectionalContrast`` (default path), forward + backward + EMA updates;
- ``protocl_step_rc``: the same with ``release_compatible=True``;
- ``protocl_loss``: ``masked_average_pool`` for both domains + ``fcl_loss`` + ``bcl_loss`` (default settings);
- ``protocl_loss_rc``: the same with the release-compatible settings (``absent="min_similarity"``,
  ``at="label"``, overlap class weight);

each protocl entry with value checks on (``-checks``) and off (``-nochecks``), and with ``--compile`` also under
``torch.compile``. Cases: the release's shapes (2 pairs, D=76, 92x92 features, 730x730 labels, K=19), D=2048, and
a sweep over the number of pixels. Peak memory: CUDA ``max_memory_allocated`` above the inputs; on CPU the peak
RSS above the resident size before the call, measured in a fresh subprocess per (case, implementation).
A second section times static-label generation (streaming ``ClassBalancedThresholds`` over a synthetic target
set) and checks that its memory does not grow with the number of images.

Outputs in ``--out`` (default ``benchmarks/results``): ``bench_<device>.json``, ``bench_<device>.md`` and
``bench_<device>.png`` (time against pixels). matplotlib is a benchmarks-only dependency.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import release_baseline

import protocl

IGNORE = 255


# ----------------------------------------------------------------------------------------------------------------
# cases and inputs


@dataclasses.dataclass(frozen=True)
class Case:
    r"""One input shape: B pairs, D channels, h x w features, H x W labels, K classes."""

    name: str
    batch: int
    dim: int
    feature_size: int
    label_size: int
    num_classes: int = 19
    heavy: bool = False  # the baseline takes seconds per call on a small CPU: fewer repeats there

    @property
    def feature_pixels(self) -> int:
        return self.batch * self.feature_size**2

    @property
    def label_pixels(self) -> int:
        return self.batch * self.label_size**2

    @property
    def feature_mb(self) -> float:
        r"""Size of the two feature tensors (source + target) in MiB, fp32."""
        return 2 * self.batch * self.dim * self.feature_size**2 * 4 / 2**20


def release_cases() -> list[Case]:
    r"""The release's shapes, D=2048, and a pixel sweep (features x2 per side, labels in proportion)."""
    return [
        Case("release", 2, 76, 92, 730),
        Case("d2048", 2, 2048, 92, 730, heavy=True),
        Case("sweep-46", 2, 76, 46, 365),
        Case("sweep-184", 2, 76, 184, 1460, heavy=True),
    ]


def quick_cases() -> list[Case]:
    r"""Tiny shapes for the smoke test (a few seconds in all)."""
    return [Case("quick-a", 2, 8, 6, 24, 5), Case("quick-b", 2, 8, 12, 48, 5)]


def blocky_labels(batch: int, size: int, num_classes: int, *, ignore_fraction: float, generator) -> torch.Tensor:
    r"""Piecewise-constant labels (regions, as in real scenes) with a fraction of ignore regions, (B, H, W)."""
    cells = max(2, size // 32)
    coarse = torch.randint(0, num_classes, (batch, 1, cells, cells), generator=generator).float()
    drop = torch.rand(batch, 1, cells, cells, generator=generator) < ignore_fraction
    coarse = torch.where(drop, torch.full_like(coarse, IGNORE), coarse)
    return F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()


def make_inputs(case: Case, device: str, *, seed: int = 0) -> dict:
    r"""Source/target features (leaves with grad) that cluster by class, source labels and static labels."""
    g = torch.Generator().manual_seed(seed)
    source_labels = blocky_labels(case.batch, case.label_size, case.num_classes, ignore_fraction=0.05, generator=g)
    target_truth = blocky_labels(case.batch, case.label_size, case.num_classes, ignore_fraction=0.05, generator=g)
    # static pseudo labels: the truth with half of the regions dropped to ignore
    keep = blocky_labels(case.batch, case.label_size, 2, ignore_fraction=0.0, generator=g) == 0
    static_labels = torch.where(keep, target_truth, torch.full_like(target_truth, IGNORE))
    centres = torch.randn(case.num_classes + 1, case.dim, generator=g)

    def features(labels):
        small = F.interpolate(labels[:, None].float(), size=(case.feature_size,) * 2, mode="nearest")[:, 0].long()
        small = small.clamp_max(case.num_classes)  # ignore -> an extra "background" centre
        noise = torch.randn(case.batch, case.feature_size, case.feature_size, case.dim, generator=g)
        return (centres[small] + 1.5 * noise).permute(0, 3, 1, 2).contiguous()  # b h w d -> b d h w

    out = {
        "source_features": features(source_labels),
        "source_labels": source_labels,
        "target_features": features(target_truth),
        "static_labels": static_labels,
    }
    out = {k: v.to(device) for k, v in out.items()}
    out["source_features"].requires_grad_(True)
    out["target_features"].requires_grad_(True)
    return out


# ----------------------------------------------------------------------------------------------------------------
# implementations: each builder returns a zero-argument callable doing forward + backward on fixed inputs


def _clear_grads(inputs: dict) -> None:
    inputs["source_features"].grad = None
    inputs["target_features"].grad = None


def build_release_step(case: Case, inputs: dict, device: str) -> Callable[[], torch.Tensor]:
    module = release_baseline.ReleaseStep(case.num_classes, case.dim).to(device)

    def run():
        _clear_grads(inputs)
        out = module(inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                     inputs["static_labels"])
        out.loss.backward()
        return out.loss.detach()

    return run


def build_release_loss(case: Case, inputs: dict, device: str) -> Callable[[], torch.Tensor]:
    def run():
        _clear_grads(inputs)
        out = release_baseline.release_losses(
            inputs["source_features"], inputs["source_labels"], inputs["target_features"],
            inputs["static_labels"], case.num_classes,
        )
        out.loss.backward()
        return out.loss.detach()

    return run


def _protocl_step_fn(case: Case, device: str, *, release_compatible: bool, compile: bool):
    module = protocl.BidirectionalContrast(
        case.num_classes, case.dim, release_compatible=release_compatible
    ).to(device)
    forward = torch.compile(module) if compile else module
    return forward


def build_protocl_step(case, inputs, device, *, release_compatible=False, compile=False):
    forward = _protocl_step_fn(case, device, release_compatible=release_compatible, compile=compile)

    def run():
        _clear_grads(inputs)
        out = forward(inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                      inputs["static_labels"])
        out.loss.backward()
        return out.loss.detach()

    return run


def protocl_losses(source_features, source_labels, target_features, target_labels, num_classes, *,
                   release_compatible: bool, fcl_weight: float = 0.1, bcl_weight: float = 0.1):
    r"""FCL + BCL with per-image prototypes, the default or the release-compatible settings (no step parts)."""
    source = protocl.masked_average_pool(source_features, source_labels, num_classes)
    target = protocl.masked_average_pool(target_features, target_labels, num_classes)
    if release_compatible:
        weight = protocl.overlap_class_weight(
            source_labels, target_labels, num_classes, size=tuple(source_features.shape[-2:])
        )
        opts = {"absent": "min_similarity", "at": "label"}
    else:
        weight, opts = None, {}
    fcl = protocl.fcl_loss(target_features, source.prototypes, target_labels, valid=source.counts > 0,
                           class_weight=weight, **opts)
    bcl = protocl.bcl_loss(source_features, target.prototypes, source_labels, valid=target.counts > 0, **opts)
    return fcl_weight * fcl + bcl_weight * bcl


def build_protocl_loss(case, inputs, device, *, release_compatible=False, compile=False):
    def loss_fn(sf, sl, tf, tl):
        return protocl_losses(sf, sl, tf, tl, case.num_classes, release_compatible=release_compatible)

    fn = torch.compile(loss_fn) if compile else loss_fn

    def run():
        _clear_grads(inputs)
        loss = fn(inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                  inputs["static_labels"])
        loss.backward()
        return loss.detach()

    return run


@dataclasses.dataclass(frozen=True)
class Impl:
    r"""One timed variant: a builder, whether value checks are on, whether it is compiled."""

    name: str
    family: str  # "step" or "loss": which baseline it is compared with
    builder: Callable
    checks: bool = True
    compile: bool = False
    release_compatible: bool = False

    @property
    def is_baseline(self) -> bool:
        return self.name.startswith("release")

    def build(self, case: Case, inputs: dict, device: str) -> Callable[[], torch.Tensor]:
        if self.is_baseline:
            return self.builder(case, inputs, device)
        return self.builder(case, inputs, device, release_compatible=self.release_compatible, compile=self.compile)


def implementations(*, compile: bool) -> list[Impl]:
    r"""All variants; compiled ones only when asked (compilation costs minutes on a small CPU)."""
    impls = [
        Impl("release_step", "step", build_release_step),
        Impl("release_loss", "loss", build_release_loss),
    ]
    for family, builder in (("step", build_protocl_step), ("loss", build_protocl_loss)):
        for rc in (False, True):
            base = f"protocl_{family}" + ("_rc" if rc else "")
            impls.append(Impl(f"{base}-checks", family, builder, True, False, rc))
            impls.append(Impl(f"{base}-nochecks", family, builder, False, False, rc))
            if compile:
                impls.append(Impl(f"{base}-compiled", family, builder, False, True, rc))
    return impls


# ----------------------------------------------------------------------------------------------------------------
# timing and memory


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _call(impl: Impl, fn: Callable, device: str) -> float:
    protocl.set_value_checks(impl.checks)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def time_case(case: Case, impls: list[Impl], device: str, *, warmup: int, repeats: int) -> dict[str, dict]:
    r"""Median forward+backward time of every implementation, repeats interleaved (ABCABC...)."""
    inputs = make_inputs(case, device)
    fns, results = {}, {}
    for impl in impls:
        fn = impl.build(case, inputs, device)
        start = time.perf_counter()
        for _ in range(warmup):
            _call(impl, fn, device)
        fns[impl.name] = fn
        results[impl.name] = {"warmup_s": time.perf_counter() - start, "times_ms": []}
    for _ in range(repeats):
        for impl in impls:
            results[impl.name]["times_ms"].append(1e3 * _call(impl, fns[impl.name], device))
    for impl in impls:
        times = results[impl.name]["times_ms"]
        results[impl.name]["median_ms"] = statistics.median(times)
        results[impl.name]["min_ms"] = min(times)
    protocl.set_value_checks(True)
    return results


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def measure_memory(case: Case, impl: Impl, device: str) -> dict:
    r"""Peak memory of one call above what is resident before it (inputs built, one warm-up call done)."""
    inputs = make_inputs(case, device)
    fn = impl.build(case, inputs, device)
    protocl.set_value_checks(impl.checks)
    fn()  # warm-up: lazy allocations, compile
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        kind = "cuda_max_memory_allocated"
    else:
        base = _rss_kb("VmRSS") * 1024
        if not _reset_peak_rss():
            raise RuntimeError("cannot reset the peak RSS (/proc/self/clear_refs); peak memory unavailable")
        fn()
        peak = _rss_kb("VmHWM") * 1024 - base
        kind = "cpu_peak_rss_above_resident"
    protocl.set_value_checks(True)
    return {"peak_extra_mb": peak / 2**20, "kind": kind, "feature_mb": case.feature_mb}


def _malloc_env() -> dict:
    r"""Environment for the memory subprocesses: a fixed glibc mmap threshold.

    By default glibc raises its mmap threshold after large blocks are freed, so the blocks of the warm-up call stay
    resident and the measured call's peak hides below the resident size. A fixed threshold (which also turns
    off that adjustment) returns every large block to the system when it is freed.
    """
    return {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def memory_in_subprocess(case: Case, impl_name: str, device: str, compile: bool) -> dict:
    r"""Run :func:`measure_memory` in a fresh interpreter so that earlier cases do not pollute the peak."""
    payload = json.dumps({"case": dataclasses.asdict(case), "impl": impl_name, "device": device,
                          "compile": compile, "threads": torch.get_num_threads()})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", payload],
                          capture_output=True, text=True, timeout=900, env=_malloc_env(), check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_worker(payload: str) -> None:
    spec = json.loads(payload)
    case = Case(**spec["case"])
    impl = {i.name: i for i in implementations(compile=spec["compile"])}[spec["impl"]]
    torch.set_num_threads(spec["threads"])
    print(json.dumps(measure_memory(case, impl, spec["device"])))


# ----------------------------------------------------------------------------------------------------------------
# static-label generation throughput


def synthetic_logits(index: int, num_classes: int, height: int, width: int, device: str) -> torch.Tensor:
    r"""Logits of one synthetic target image, (1, K, H, W), regenerated from its index (nothing is stored)."""
    g = torch.Generator().manual_seed(10_000 + index)
    labels = blocky_labels(1, max(height, width), num_classes, ignore_fraction=0.0, generator=g)[:, :height, :width]
    logits = torch.randn(1, num_classes, height, width, generator=g)
    logits = logits + 4.0 * F.one_hot(labels, num_classes).permute(0, 3, 1, 2)
    return logits.to(device)


def static_label_throughput(num_images: int, num_classes: int, height: int, width: int, device: str, *,
                            bins: int = 4096, exact: bool = True) -> dict:
    r"""Two streaming passes over a synthetic target set: thresholds, then labels; images/s of each pass.

    With ``exact=True`` also computes the exact class-balanced thresholds by keeping every confidence (the
    release's approach, memory O(N H W)) to report the error of the histogram thresholds and its speed.
    """
    thresholds = protocl.ClassBalancedThresholds(num_classes, proportion=0.1, bins=bins).to(device)
    update_s = label_s = 0.0
    per_class = [[] for _ in range(num_classes)] if exact else None
    exact_s = 0.0
    for i in range(num_images):
        logits = synthetic_logits(i, num_classes, height, width, device)
        _sync(device)
        start = time.perf_counter()
        thresholds.update(logits)
        _sync(device)
        update_s += time.perf_counter() - start
        if exact:
            start = time.perf_counter()
            conf, pred = logits.softmax(dim=1).max(dim=1)
            for k in torch.unique(pred).tolist():
                per_class[k].append(conf[pred == k])
            exact_s += time.perf_counter() - start
    class_thresholds = thresholds.compute()
    for i in range(num_images):
        logits = synthetic_logits(i, num_classes, height, width, device)
        _sync(device)
        start = time.perf_counter()
        labels = protocl.static_pseudo_label(logits, class_thresholds=class_thresholds, proportion=0.1)
        _sync(device)
        label_s += time.perf_counter() - start
    result = {
        "images": num_images, "classes": num_classes, "height": height, "width": width, "bins": bins,
        "update_images_per_s": num_images / update_s,
        "label_images_per_s": num_images / label_s,
        "both_passes_images_per_s": num_images / (update_s + label_s),
        "state_bytes": sum(b.numel() * b.element_size() for b in thresholds.buffers()),
        "kept_fraction_last_image": float((labels != IGNORE).float().mean()),
    }
    if exact:
        start = time.perf_counter()
        exact_thr = torch.full((num_classes,), float("inf"))
        for k, chunks in enumerate(per_class):
            if chunks:
                values = torch.cat(chunks)
                n = max(1, int(0.1 * values.numel()))
                exact_thr[k] = values.topk(n).values[-1]
        exact_s += time.perf_counter() - start
        finite = torch.isfinite(exact_thr)
        result["exact_images_per_s"] = num_images / exact_s
        result["max_abs_error_vs_exact"] = float(
            (class_thresholds.cpu()[finite] - exact_thr[finite]).abs().max()) if finite.any() else 0.0
        result["exact_kept_bytes"] = sum(c.numel() * c.element_size() for chunks in per_class for c in chunks)
    return result


def static_memory_in_subprocess(num_images: int, num_classes: int, height: int, width: int, device: str) -> dict:
    r"""Peak RSS of the streaming passes (no exact reference) in a fresh interpreter."""
    payload = json.dumps({"images": num_images, "classes": num_classes, "height": height, "width": width,
                          "device": device})
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--static-memory-worker", payload],
                          capture_output=True, text=True, timeout=900, env=_malloc_env(), check=False)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _static_memory_worker(payload: str) -> None:
    spec = json.loads(payload)
    # warm up with one image so allocator pools and lazy imports are resident before the peak is reset
    static_label_throughput(1, spec["classes"], spec["height"], spec["width"], spec["device"], exact=False)
    gc.collect()
    base = _rss_kb("VmRSS") * 1024
    _reset_peak_rss()
    static_label_throughput(spec["images"], spec["classes"], spec["height"], spec["width"], spec["device"],
                            exact=False)
    print(json.dumps({"images": spec["images"], "peak_extra_mb": (_rss_kb("VmHWM") * 1024 - base) / 2**20}))


# ----------------------------------------------------------------------------------------------------------------
# reporting


def machine_description(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else "unknown"
    except OSError:
        info["cpu_model"] = "unknown"
    try:
        info["load_avg_1_5_15"] = os.getloadavg()
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def speedups(timing: dict[str, dict], stat: str = "median_ms") -> dict[str, float]:
    r"""Baseline time / implementation time (``stat``: median or min), steps against ``release_step``, losses
    against ``release_loss``."""
    out = {}
    for name, res in timing.items():
        if name.startswith("release"):
            continue
        family = "step" if name.startswith("protocl_step") else "loss"
        base = timing.get(f"release_{family}")
        if base is not None:
            out[name] = base[stat] / res[stat]
    return out


def goals(report: dict) -> dict:
    r"""The issue's CPU goals evaluated on the measured medians (value checks on: the default user setting)."""
    out = {}
    main = next((c for c in report["cases"] if c["case"]["dim"] == 76 and c["case"]["feature_size"] == 92), None)
    wide = next((c for c in report["cases"] if c["case"]["dim"] == 2048), None)
    for checks in ("checks", "nochecks"):
        for stat, key in (("median", "speedup"), ("min", "speedup_min")):
            for label, entry in (("d76", main), ("d2048", wide)):
                if entry is None:
                    continue
                out[f"default_step_speedup_{label}_{checks}_{stat}"] = entry[key].get(f"protocl_step-{checks}")
                out[f"rc_step_speedup_{label}_{checks}_{stat}"] = entry[key].get(f"protocl_step_rc-{checks}")
    sweep = sorted((c for c in report["cases"] if c["case"]["dim"] == report["sweep_dim"]),
                   key=lambda c: c["case"]["feature_size"])
    for stat, key in (("median_ms", "time_ratio_for_4x_pixels"), ("min_ms", "time_ratio_for_4x_pixels_min")):
        ratios = {}
        for small, big in zip(sweep, sweep[1:]):
            if big["case"]["feature_size"] != 2 * small["case"]["feature_size"]:
                continue
            for name in big["timing"]:
                ratio_key = f"{name}:{small['case']['name']}->{big['case']['name']}"
                ratios[ratio_key] = big["timing"][name][stat] / small["timing"][name][stat]
        out[key] = ratios
    return out


def markdown(report: dict) -> str:
    lines = [f"# protocl benchmark ({report['machine']['device']})", ""]
    m = report["machine"]
    lines.append(f"Machine: {m.get('cpu_model')} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']}), "
                 f"{m.get('gpu', 'no GPU')}, torch {m['torch']}, Python {m['python']}. "
                 f"Load average at start {m.get('load_avg_1_5_15')}. Command: `{report['command']}`.")
    lines.append("")
    lines.append("Median forward+backward time of interleaved repeats; speed-up = baseline median / median "
                 "(step variants against `release_step`, loss variants against `release_loss`). "
                 "Peak = memory above the resident inputs during one call.")
    lines.append("")
    for c in report["cases"]:
        case = c["case"]
        lines.append(f"## {case['name']}: B={case['batch']}, D={case['dim']}, features {case['feature_size']}², "
                     f"labels {case['label_size']}², K={case['num_classes']} "
                     f"(feature tensors {c['feature_mb']:.1f} MiB)")
        lines.append("")
        lines.append("| implementation | median ms | min ms | speed-up (median) | speed-up (min) | peak extra MiB |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, res in c["timing"].items():
            sp, sp_min = c["speedup"].get(name), c.get("speedup_min", {}).get(name)
            mem = c.get("memory", {}).get(name, {})
            peak = f"{mem['peak_extra_mb']:.1f}" if "peak_extra_mb" in mem else mem.get("error", "-")
            lines.append(f"| {name} | {res['median_ms']:.2f} | {res['min_ms']:.2f} | "
                         f"{'-' if sp is None else f'{sp:.1f}x'} | {'-' if sp_min is None else f'{sp_min:.1f}x'} "
                         f"| {peak} |")
        lines.append("")
    lines.append("## Goals")
    lines.append("")
    for key, value in report["goals"].items():
        if isinstance(value, dict):
            for k, v in value.items():
                lines.append(f"- {key} {k}: {v:.2f}")
        else:
            lines.append(f"- {key}: {'-' if value is None else f'{value:.1f}x'}")
    if "static_labels" in report:
        s = report["static_labels"]
        lines += ["", "## Static-label generation (streaming ClassBalancedThresholds)", ""]
        t = s["throughput"]
        lines.append(f"{t['images']} synthetic images of {t['classes']}x{t['height']}x{t['width']} logits, "
                     f"{t['bins']} bins: update pass {t['update_images_per_s']:.1f} images/s, labelling pass "
                     f"{t['label_images_per_s']:.1f} images/s, both {t['both_passes_images_per_s']:.1f} images/s; "
                     f"state {t['state_bytes']} bytes. Exact reference (keeps every confidence): "
                     f"{t.get('exact_images_per_s', float('nan')):.1f} images/s, "
                     f"{t.get('exact_kept_bytes', 0) / 2**20:.1f} MiB kept; max |threshold error| "
                     f"{t.get('max_abs_error_vs_exact', float('nan')):.2e}.")
        for mem in s.get("memory", []):
            lines.append(f"- peak RSS above resident, {mem.get('images')} images: "
                         f"{mem.get('peak_extra_mb', float('nan')):.1f} MiB {mem.get('error', '')}")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted((c for c in report["cases"] if c["case"]["dim"] == report["sweep_dim"]),
                   key=lambda c: c["case"]["feature_size"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    names = [n for n in sweep[0]["timing"] if n.startswith("release") or n.endswith(("-checks", "-compiled"))]
    for name in names:
        xs = [c["case"]["feature_pixels"] for c in sweep if name in c["timing"]]
        ys = [c["timing"][name]["median_ms"] for c in sweep if name in c["timing"]]
        style = "--" if name.startswith("release") else "-"
        ax.plot(xs, ys, style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("feature pixels per batch (B·h·w); labels scale with them")
    ax.set_ylabel("median forward+backward time (ms)")
    ax.set_title(f"protocl vs release loops, D={report['sweep_dim']}, {report['machine']['device']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="also time torch.compile variants of protocl")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repeats (smoke test)")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--cases", default=None, help="comma-separated case names to run (default: all)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-static", action="store_true", help="skip the static-label section")
    p.add_argument("--static-images", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (default: torch's default); 1 is steadier on a shared CPU")
    p.add_argument("--formats", default="json,md,png", help="outputs to write, among json, md, png")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--static-memory-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(args: argparse.Namespace, argv: list[str] | None) -> dict:
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("expected a CUDA device for --device cuda, got torch.cuda.is_available() == False")
    cases = quick_cases() if args.quick else release_cases()
    if args.cases:
        wanted = set(args.cases.split(","))
        cases = [c for c in cases if c.name in wanted]
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    impls = implementations(compile=args.compile)
    report = {
        "command": "python benchmarks/bench_step.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_description(device),
        "warmup": warmup, "repeats": repeats,
        "sweep_dim": min(c.dim for c in cases),
        "cases": [],
    }
    for case in cases:
        # slow baselines at large shapes get fewer repeats only through --repeats; keep all equal by default
        light = case.heavy and device == "cpu" and args.repeats is None
        timing = time_case(case, impls, device, warmup=1 if light else warmup,
                           repeats=max(3, repeats // 2) if light else repeats)
        entry = {"case": {**dataclasses.asdict(case), "feature_pixels": case.feature_pixels,
                          "label_pixels": case.label_pixels},
                 "feature_mb": case.feature_mb, "timing": timing, "speedup": speedups(timing),
                 "speedup_min": speedups(timing, "min_ms")}
        if not args.no_memory and (device == "cuda" or not case.name.startswith("sweep")):
            entry["memory"] = {
                impl.name: (measure_memory(case, impl, device) if device == "cuda"
                            else memory_in_subprocess(case, impl.name, device, args.compile))
                for impl in impls if not impl.name.endswith("-nochecks")
            }
        report["cases"].append(entry)
        print(f"[bench] {case.name}: " + ", ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in timing.items()),
              flush=True)
        if "json" in args.formats.split(","):  # partial results survive a timeout
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{_stem(args)}.json").write_text(json.dumps(report, indent=1))
    report["goals"] = goals(report)
    if not args.no_static:
        n = args.static_images or (2 if args.quick else 16)
        shape = (5, 16, 32) if args.quick else (19, 512, 1024)
        static = {"throughput": static_label_throughput(n, *shape, device)}
        if not args.no_memory and device == "cpu":
            static["memory"] = [static_memory_in_subprocess(k, *shape, device) for k in (n // 2 or 1, 2 * n)]
        report["static_labels"] = static
        print(f"[bench] static labels: {static['throughput']}", flush=True)
    return report


def _stem(args: argparse.Namespace) -> str:
    return f"bench_{args.device}" + ("_quick" if args.quick else "") + ("_compile" if args.compile else "")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        _memory_worker(args.memory_worker)
        return {}
    if args.static_memory_worker:
        _static_memory_worker(args.static_memory_worker)
        return {}
    report = run(args, argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = _stem(args)
    formats = set(args.formats.split(","))
    if "json" in formats:
        (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1))
    if "md" in formats:
        (args.out / f"{stem}.md").write_text(markdown(report))
    if "png" in formats:
        try:
            plot(report, args.out / f"{stem}.png")
        except ImportError:  # matplotlib is a benchmarks-only dependency; the GPU machine may lack it
            print("[bench] matplotlib missing: no PNG written", flush=True)
    print(f"[bench] wrote {args.out / stem}.{{{args.formats}}}", flush=True)
    return report


if __name__ == "__main__":
    main()
