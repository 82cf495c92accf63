r"""protocl's losses against the authors' release loops, side by side: one question, one table per machine.

    python benchmarks/bench.py                      # CPU, 2 threads: the table of docs/benchmarks.md
    python benchmarks/bench.py --device cuda        # on a GPU
    python benchmarks/bench.py --compile            # also protocl under torch.compile
    python benchmarks/bench.py --cases checks --threads 1   # the cost of the default value checks (protocl_checked)
    python -m benchmarks.bench --cases step --no-memory     # the pipeline's signals: recompute vs the step's output

What is timed, forward + backward, on the same inputs in one process: FCL + BCL with per-image prototypes
(``masked_average_pool`` of both domains), i.e. the contrastive part of one training step.

- ``release``: ``release_baseline.release_losses``, the release's ``metric_loss`` ported statement by statement
  (its loops over pairs and classes, ``torch.unique`` host reads, ``F.normalize``, the cosine map upsampled to
  label resolution, ``CrossEntropyLoss(weight=overlap)``); the same code is the oracle of
  ``tests/test_release_compat.py``. The release's dead dynamic-label draft (lines 73-91) is left out: the real
  release is slower than this baseline.
- ``protocl``: ``masked_average_pool`` x 2 + ``fcl_loss`` + ``bcl_loss``, default settings.
- ``protocl_rc``: the release-compatible setting, ``BidirectionalContrast(release_compatible=True,
  dynamic=False)`` without the EMA updates (``absent="min_similarity"``, ``at="label"``, the overlap class weight
  on both terms, the mean over pairs): equal in value to ``release`` up to fp32 rounding (tested).
- ``protocl_checked`` (with ``--checks``, or ``--cases checks``): ``protocl`` with the default value checks on, as a user who never calls
  ``protocl.set_value_checks`` runs it. Each call passes fresh views of the label maps (new tensor objects, as a
  data loader yields every step); the difference to ``protocl`` is the cost of the default checks.
- ``--before SRC`` (issue 28): the protocl package under ``SRC`` (e.g. ``src`` of a git worktree of an earlier
  commit), imported beside the installed one as ``protocl_before`` and timed in the same rounds:
  ``before_protocl``, ``before_protocl_rc`` (``before_protocl_checked``; with ``--cases step``:
  ``before_step_output``, ``before_step_no_signals``). ``vs_before`` is the median of the per-round ratios
  now / before (below 1: faster now).

``--cases step`` (issue 25) times something else: the contrastive part of a stage-2 step of the reference
pipeline with its label-free signals on (``uda.signals``, importable when run as ``python -m benchmarks.bench``),
on the tiny demo's shapes (TinySegNet: D = 4K = 76, output stride 4; ``--crop 48``, batch 4, threshold 0.9, EMA
momentum 0.99) and on the release's D = 76 at 46² / 365² (2 pairs). Both run ``BidirectionalContrast`` forward
(EMA updates included) + ``signals.step_counts`` + the backward of its loss:

- ``step_before``: the pipeline before issue 25: the cosines behind y_D recomputed before the step
  (``signals.similarities`` as it was: a second pooling and cosine map) and ``step_counts`` as it was (seven
  index maps, one float64 scatter);
- ``step_recompute``: the same recompute with today's ``step_counts`` (three label maps, one int64 scatter);
- ``step_output``: the step called with ``return_similarities=True`` and the cosines taken from its output
  (``signals.Similarities.from_output``). Both give bit-equal signal counts (``tests/test_signals_output.py``);
- ``step_no_signals``: the step alone (``--no-signals``), for scale: ``step_output`` − ``step_no_signals`` is
  what the signals still cost (``step_counts``).

Timing: ``torch.utils.benchmark.Timer`` with ``--threads`` threads; ``--rounds`` rounds, each timing every
implementation once in turn (so that machine load hits all alike); the median of the rounds. Value checks off,
except in ``protocl_checked``.
Peak memory: on CUDA ``max_memory_allocated`` above the inputs; on CPU the peak RSS above the resident size, in a
fresh interpreter per (case, implementation). Results: ``<out>/bench_<device>.md`` and ``.json``
(``--cases step``: ``<out>/bench_step_<device>.md`` and ``.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

HERE = Path(__file__).resolve().parent

import release_baseline  # noqa: E402

import protocl  # noqa: E402

IGNORE = 255


@dataclasses.dataclass(frozen=True)
class Case:
    r"""One input shape: B pairs, D channels, h x w features, H x W labels, K classes."""

    name: str
    batch: int
    dim: int
    feature_size: int
    label_size: int
    num_classes: int = 19

    @property
    def feature_mb(self) -> float:
        r"""Size of the two feature tensors (source + target) in MiB, fp32."""
        return 2 * self.batch * self.dim * self.feature_size**2 * 4 / 2**20


CASES = {
    "issue": [Case("d76-46", 2, 76, 46, 365), Case("d2048-46", 2, 2048, 46, 365),
              Case("d76-92", 2, 76, 92, 730), Case("d2048-92", 2, 2048, 92, 730)],
    "quick": [Case("quick-a", 2, 8, 6, 24, 5), Case("quick-b", 2, 8, 12, 48, 5)],
    # the cost of the default value checks at the release's label size (2, 730, 730) and at half of it
    "checks": [Case("d76-46", 2, 76, 46, 365), Case("d76-92", 2, 76, 92, 730)],
    # issue 25: a stage-2 step's signals from the orchestrator's output against their recompute (step_*)
    "step": [Case("demo", 4, 76, 12, 48, 19), Case("d76-46", 2, 76, 46, 365)],
}
STEP_SETTINGS = {"threshold": 0.9, "momentum": 0.99}  # the tiny demo's (uda.options DEFAULTS["tiny"])
# the goals of issue 12: (case, implementation, minimum speed-up over the release)
GOALS = [("d76-46", "protocl", 15.0), ("d76-46", "protocl_rc", 6.0), ("d2048-46", "protocl", 4.0),
         ("d76-92", "protocl", 15.0), ("d76-92", "protocl_rc", 6.0), ("d2048-92", "protocl", 4.0)]


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
    keep = blocky_labels(case.batch, case.label_size, 2, ignore_fraction=0.0, generator=g) == 0
    static_labels = torch.where(keep, target_truth, torch.full_like(target_truth, IGNORE))
    centres = torch.randn(case.num_classes + 1, case.dim, generator=g)

    def features(labels):
        small = F.interpolate(labels[:, None].float(), size=(case.feature_size,) * 2, mode="nearest")[:, 0].long()
        small = small.clamp_max(case.num_classes)  # ignore -> an extra "background" centre
        noise = torch.randn(case.batch, case.feature_size, case.feature_size, case.dim, generator=g)
        return (centres[small] + 1.5 * noise).permute(0, 3, 1, 2).contiguous()  # b h w d -> b d h w

    out = {"source_features": features(source_labels), "source_labels": source_labels,
           "target_features": features(target_truth), "static_labels": static_labels}
    out = {k: v.to(device) for k, v in out.items()}
    out["source_features"].requires_grad_(True)
    out["target_features"].requires_grad_(True)
    return out


def protocl_losses(source_features, source_labels, target_features, target_labels, num_classes, *,
                   fcl_weight: float = 0.1, bcl_weight: float = 0.1, lib=protocl):
    r"""FCL + BCL with per-image prototypes, default settings: what a trainer writes with the functional API
    (``lib``: protocl, or the library of ``--before``)."""
    source = lib.masked_average_pool(source_features, source_labels, num_classes)
    target = lib.masked_average_pool(target_features, target_labels, num_classes)
    fcl = lib.fcl_loss(target_features, source.prototypes, target_labels, valid=source.counts > 0)
    bcl = lib.bcl_loss(source_features, target.prototypes, source_labels, valid=target.counts > 0)
    return fcl_weight * fcl + bcl_weight * bcl


def load_before(src: str):
    r"""``--before SRC``: the protocl package under ``SRC`` (e.g. ``src`` of a git worktree of an earlier commit),
    imported as ``protocl_before`` beside the installed one, so that both are timed in the same run, round by
    round (protocl imports itself only relatively)."""
    init = Path(src) / "protocl" / "__init__.py"
    if not init.is_file():
        raise ValueError(f"--before: expected a directory holding protocl/__init__.py, got {src!r}")
    spec = importlib.util.spec_from_file_location("protocl_before", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["protocl_before"] = module
    spec.loader.exec_module(module)
    return module


def libraries(before) -> list:
    r"""``[(library, name prefix)]``: protocl (no prefix), and the ``--before`` library (``before_``)."""
    return [(protocl, "")] + ([(before, "before_")] if before is not None else [])


def implementations(case: Case, inputs: dict, *, compile: bool = False, checks: bool = False, before=None) -> dict:
    r"""Zero-argument callables doing forward + backward on ``inputs``; each returns the (detached) loss."""
    args = (inputs["source_features"], inputs["source_labels"], inputs["target_features"], inputs["static_labels"])

    def run(fn):
        def call():
            inputs["source_features"].grad = None
            inputs["target_features"].grad = None
            loss = fn(*args)
            loss.backward()
            return loss.detach()

        return call

    def release(*a):
        return release_baseline.release_losses(*a, case.num_classes).loss

    impls = {"release": run(release)}
    for lib, prefix in libraries(before):
        def default(*a, lib=lib):
            return protocl_losses(*a, case.num_classes, lib=lib)

        step = lib.BidirectionalContrast(case.num_classes, case.dim, release_compatible=True, dynamic=False)

        def compatible(*a, step=step):
            return step(*a, update=False).loss

        def checked(source_features, source_labels, target_features, target_labels, lib=lib, default=default):
            was = lib.value_checks_enabled()
            lib.set_value_checks(True)  # the default
            try:  # fresh views: new label tensors as every training step has
                return default(source_features, source_labels.view_as(source_labels), target_features,
                               target_labels.view_as(target_labels))
            finally:
                lib.set_value_checks(was)

        impls[prefix + "protocl"] = run(default)
        impls[prefix + "protocl_rc"] = run(compatible)
        if checks:
            impls[prefix + "protocl_checked"] = run(checked)
    if compile:
        impls["protocl_compiled"] = run(torch.compile(lambda *a: protocl_losses(*a, case.num_classes)))
    return impls


@torch.no_grad()
def recompute_similarities(contrast, source_features, source_labels, target_features):
    r"""The pipeline's recompute before issue 25 (``uda.signals.similarities`` as it was), called before the step."""
    from uda import signals

    K = contrast.num_classes
    pooled = protocl.masked_average_pool(source_features.detach(), source_labels, K,
                                         ignore_index=contrast.ignore_index, per_image=True)
    anchors = contrast.calibrated(pooled.prototypes) if contrast.calibrate else pooled.prototypes
    valid = pooled.counts > 0
    cosine = protocl.cosine_similarity_map(target_features.detach(), anchors)
    cosine = torch.where(valid[:, :, None, None], cosine, torch.full_like(cosine, -float("inf")))
    return signals.Similarities(cosine, valid)


@torch.no_grad()
def step_counts_before(static, dynamic, hybrid, prediction, sims, threshold: float, num_classes: int):
    r"""``uda.signals.step_counts`` as it was before issue 25 (seven index maps, one float64 scatter of all seven);
    equal values to today's (tests/test_signals_output.py)."""
    from uda import signals

    K, ig = num_classes, IGNORE
    has_s, has_d, has_h = static != ig, dynamic != ig, hybrid != ig
    d = torch.where(has_d, dynamic, K)
    h = torch.where(has_h, hybrid, K)
    index = torch.stack([
        torch.where(has_s, d, K), torch.where(has_s & (static == dynamic), d, K), d,
        torch.where(prediction == dynamic, d, K), h, torch.where(prediction == hybrid, h, K),
        torch.where(has_s, static, K),
    ]).flatten(1)
    counts = signals._scatter(index, torch.ones_like(index, dtype=torch.float64), index.shape[0], K)
    top = sims.cosine.float().flatten(2).topk(min(2, K), dim=1).values
    best = top[:, 0]
    second = top[:, 1].clamp_min(-1.0) if K > 1 else torch.full_like(best, -1.0)
    cell_class = torch.where(best > threshold, sims.cosine.flatten(2).argmax(1), K).flatten()
    margin = torch.nan_to_num(best - second, nan=0.0, posinf=0.0, neginf=0.0).flatten().double()
    cells = signals._scatter(torch.stack([cell_class, cell_class]), torch.stack([margin, torch.ones_like(margin)]),
                             2, K)
    return torch.cat([counts[:6], cells, counts[6:]])


def step_implementations(case: Case, inputs: dict, before=None) -> dict:
    r"""``--cases step``: zero-argument callables running the orchestrator's step (forward, EMA updates, backward
    of its loss) and the label-free signal counts of the step: as before issue 25 (``step_before``), with the
    cosines recomputed (``step_recompute``) or taken from the step's output (``step_output``), or without the
    signals (``step_no_signals``, counts None). Each returns ``(loss, counts)``, detached."""
    try:
        from uda import signals
    except ImportError as e:  # bench.py run as a script: examples/ is not on the path
        raise ImportError("--cases step: expected the reference pipeline's uda package on the path; run "
                          "`python -m benchmarks.bench --cases step` from the repository root") from e
    fs, ys, ft, yf = (inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                      inputs["static_labels"])
    K = case.num_classes
    g = torch.Generator().manual_seed(1)
    prediction = torch.randint(0, K, yf.shape, generator=g).to(yf.device)  # the classifier's argmax, fixed

    def run(kind: str, lib=protocl):
        contrast = lib.BidirectionalContrast(K, case.dim, sync=False, **STEP_SETTINGS).to(fs.device)
        count = step_counts_before if kind == "before" else signals.step_counts

        def call():
            fs.grad = ft.grad = None
            sims = recompute_similarities(contrast, fs, ys, ft) if kind in ("before", "recompute") else None
            out = contrast(fs, ys, ft, yf, return_similarities=kind == "output")
            counts = None
            if kind != "none":
                if kind == "output":
                    sims = signals.Similarities.from_output(out)
                counts = count(yf, out.dynamic_labels, out.target_labels, prediction, sims, contrast.threshold, K)
            out.loss.backward()
            return out.loss.detach(), counts

        return call

    impls = {"step_before": run("before"), "step_recompute": run("recompute"), "step_output": run("output"),
             "step_no_signals": run("none")}
    if before is not None:
        impls.update({"before_step_output": run("output", before), "before_step_no_signals": run("none", before)})
    return impls


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_case(case: Case, device: str, *, threads: int, rounds: int, min_time: float, compile: bool,
              checks: bool = False, step: bool = False, before=None) -> dict:
    r"""Median seconds per call of every implementation over ``rounds`` interleaved rounds (``step``: those of
    :func:`step_implementations`)."""
    inputs = make_inputs(case, device)
    if step:
        impls = step_implementations(case, inputs, before)
    else:
        impls = implementations(case, inputs, compile=compile, checks=checks, before=before)
    for lib, _ in libraries(before):
        lib.set_value_checks(False)
    try:
        timers = {}
        for name, fn in impls.items():
            fn()  # warm-up (and compilation)
            _sync(device)
            timers[name] = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, label=case.name,
                                    description=name)
        per_round = {name: [] for name in impls}
        for _ in range(rounds):
            for name, timer in timers.items():
                per_round[name].append(timer.blocked_autorange(min_run_time=min_time).median)
    finally:
        for lib, _ in libraries(before):
            lib.set_value_checks(True)
    out = {name: {"median_ms": 1e3 * statistics.median(times), "rounds_ms": [1e3 * t for t in times]}
           for name, times in per_round.items()}
    for name in per_round:  # --before: now / before, the median of the per-round ratios (paired, as below)
        if "before_" + name in per_round:
            out[name]["vs_before"] = statistics.median(
                n / b for n, b in zip(per_round[name], per_round["before_" + name]))
    if "protocl_checked" in per_round:  # paired per round: machine load cancels better than in two medians
        diffs = [c - u for c, u in zip(per_round["protocl_checked"], per_round["protocl"])]
        out["protocl_checked"]["check_cost_ms"] = 1e3 * statistics.median(diffs)
        out["protocl_checked"]["check_ms_per_label_map"] = 1e3 * time_one_check(inputs["static_labels"], case,
                                                                                threads=threads, min_time=min_time)
    if step:  # paired per round, as above
        for name in ("step_recompute", "step_output"):
            diffs = [r - o for r, o in zip(per_round["step_before"], per_round[name])]
            out[name]["saved_ms"] = 1e3 * statistics.median(diffs)
    return out


def time_one_check(labels: torch.Tensor, case: Case, *, threads: int, min_time: float) -> float:
    r"""Seconds of the default value check of one ``(B, H, W)`` label map (what each label map of a step pays
    once), timed on fresh views (new tensor objects, as every training step has). Calls protocl's private
    ``_validation.check_label_values``, the function every public entry point calls."""
    from protocl import _validation

    def check():
        _validation.check_label_values(labels.view_as(labels), case.num_classes, IGNORE, "labels", "bench")

    was = protocl.value_checks_enabled()
    protocl.set_value_checks(True)
    try:
        check()
        return tb.Timer(stmt="check()", globals={"check": check}, num_threads=threads).blocked_autorange(
            min_run_time=min_time).median
    finally:
        protocl.set_value_checks(was)


# --------------------------------------------------------------------------------------------------- memory


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(case: Case, name: str, device: str) -> dict:
    r"""Peak memory of one call above what is resident before it (inputs built, one warm-up call done)."""
    inputs = make_inputs(case, device)
    fn = (step_implementations if name.startswith("step_") else implementations)(case, inputs)[name]
    protocl.set_value_checks(False)
    fn()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return {"peak_extra_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    base = _rss_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    fn()
    return {"peak_extra_mb": (_rss_kb("VmHWM") * 1024 - base) / 2**20}


def memory_in_subprocess(case: Case, name: str, device: str, threads: int) -> dict:
    r""":func:`measure_memory` in a fresh interpreter (earlier cases cannot pollute the peak); glibc's mmap
    threshold is fixed so that freed large blocks leave the resident size."""
    payload = json.dumps({"case": dataclasses.asdict(case), "impl": name, "device": device, "threads": threads})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--memory-worker", payload],
                          capture_output=True, text=True, timeout=900, env=env, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"rc {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------------- report


def write_report(report: dict, out: Path, stem: str, name: str) -> Path:
    """``report`` as ``<out>/<stem>.json`` (non-JSON values as ``str``), announced as ``[name] wrote <path>``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"[{name}] wrote {path}", flush=True)
    return path


def machine_description(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else "unknown"
    except OSError:
        info["cpu_model"] = "unknown"
    try:
        info["load_avg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def step_table(report: dict) -> str:
    r"""``--cases step`` as a Markdown table: one row per case, the two steps and what the recompute cost."""
    lines = ["| case | step_before ms | step_recompute ms | step_output ms | step_no_signals ms | saved by "
             "step_output ms (median of per-round differences) | share of step_before | peak extra MiB (before / "
             "output) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in report["cases"]:
        t, case, mem = c["timing"], c["case"], c.get("memory", {})
        before = t["step_before"]["median_ms"]
        peak = " / ".join(f"{mem[n]['peak_extra_mb']:.0f}" if "peak_extra_mb" in mem.get(n, {}) else "-"
                          for n in ("step_before", "step_output"))
        times = " | ".join(f"{t[n]['median_ms']:.2f}" for n in ("step_before", "step_recompute", "step_output",
                                                                 "step_no_signals"))
        lines.append(f"| {case['name']} (B={case['batch']}, D={case['dim']}, {case['feature_size']}²/"
                     f"{case['label_size']}², K={case['num_classes']}) | {times} | "
                     f"{t['step_output']['saved_ms']:.2f} | {100 * t['step_output']['saved_ms'] / before:.0f} % | "
                     f"{peak} |")
    return "\n".join(lines)


def table(report: dict) -> str:
    r"""The results as a Markdown table: one row per case, times and speed-ups against the release."""
    names = [n for n in report["cases"][0]["timing"] if n != "release"]
    head = ["case", "release ms"] + [f"{n} ms | speed-up" for n in names] + ["peak extra MiB (release / protocl)"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) + len(names) - 1)) + " |"]
    for c in report["cases"]:
        t = c["timing"]
        base = t["release"]["median_ms"]
        cells = [f"{c['case']['name']} (D={c['case']['dim']}, {c['case']['feature_size']}²/{c['case']['label_size']}²)",
                 f"{base:.1f}"]
        for n in names:
            cells.append(f"{t[n]['median_ms']:.1f} | {base / t[n]['median_ms']:.1f}×")
        mem = c.get("memory", {})
        cells.append(" / ".join(f"{mem[n]['peak_extra_mb']:.0f}" if "peak_extra_mb" in mem.get(n, {}) else "-"
                                for n in ("release", "protocl")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def before_table(report: dict) -> str:
    r"""``--before``: now / before per case and implementation (median of per-round ratios), or nothing."""
    rows = [(c["case"]["name"], name, t) for c in report["cases"] for name, t in c["timing"].items() if "vs_before" in t]
    if not rows:
        return ""
    lines = ["", "| case | implementation | now ms | before ms | now / before (median of per-round ratios) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for case, name, t in rows:
        b = next(c["timing"]["before_" + name] for c in report["cases"] if c["case"]["name"] == case)
        lines.append(f"| {case} | {name} | {t['median_ms']:.2f} | {b['median_ms']:.2f} | {t['vs_before']:.3f} |")
    return "\n".join(lines) + "\n"


def goals(report: dict) -> list[dict]:
    by_name = {c["case"]["name"]: c["timing"] for c in report["cases"]}
    out = []
    for case, impl, target in GOALS:
        if case in by_name and impl in by_name[case]:
            speedup = by_name[case]["release"]["median_ms"] / by_name[case][impl]["median_ms"]
            out.append({"case": case, "implementation": impl, "goal": target, "speedup": speedup,
                        "met": speedup >= target})
    return out


def markdown(report: dict) -> str:
    m = report["machine"]
    if "step_output" in report["cases"][0]["timing"]:
        return "\n".join([
            f"# The pipeline's signals: recomputed vs from the orchestrator's output ({m['device']})", "",
            f"Machine: {m.get('cpu_model')} ({m['cpu_count']} CPUs), {m.get('gpu', 'no GPU')}, torch threads "
            f"{report['threads']}, torch {m['torch']}, Python {m['python']}; load average at start "
            f"{m.get('load_avg_1_5_15')}.", f"Command: `{report['command']}`.", "",
            "BidirectionalContrast forward (EMA updates) + uda.signals.step_counts + backward of the step's loss, "
            "value checks off; step_before: the cosines behind y_D recomputed before the step and step_counts as "
            "before issue 25; step_recompute: the same recompute, today's step_counts; step_output: the cosines "
            "from the step's output (return_similarities=True), today's step_counts; step_no_signals: the step "
            f"alone. Median of {report['rounds']} interleaved rounds.",
            "", step_table(report), ""])
    lines = [f"# protocl vs the release's loops ({m['device']})", "",
             f"Machine: {m.get('cpu_model')} ({m['cpu_count']} CPUs), {m.get('gpu', 'no GPU')}, torch threads "
             f"{report['threads']}, torch {m['torch']}, Python {m['python']}; load average at start "
             f"{m.get('load_avg_1_5_15')}.", f"Command: `{report['command']}`.", "",
             "FCL + BCL with `masked_average_pool` of both domains, forward + backward, 2 pairs, value "
             "checks off (`protocl_checked`: the default checks on, each label map checked once per call); median "
             f"of {report['rounds']} interleaved rounds (`torch.utils.benchmark`); speed-up = release / protocl.",
             "", table(report), ""]
    costs = [(c["case"], c["timing"]["protocl_checked"], c["timing"]["protocl"]["median_ms"])
             for c in report["cases"] if "check_cost_ms" in c["timing"].get("protocl_checked", {})]
    if costs:
        lines += ["| case | default value checks per step (median of per-round protocl_checked - protocl) | "
                  "one label map's check |", "| --- | ---: | ---: |"]
        lines += [f"| {case['name']} ({case['batch']}, {case['label_size']}, {case['label_size']}) | "
                  f"{t['check_cost_ms']:.2f} ms ({100 * t['check_cost_ms'] / base:.1f} % of the step) | "
                  f"{t['check_ms_per_label_map']:.2f} ms |" for case, t, base in costs]
        lines += [""]
    if report["goals"]:
        lines += ["| goal | speed-up | met |", "| --- | ---: | --- |"]
        lines += [f"| {g['case']} {g['implementation']} ≥ {g['goal']:g}× | {g['speedup']:.1f}× | "
                  f"{'yes' if g['met'] else 'no'} |" for g in report["goals"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the table of the docs: 2)")
    p.add_argument("--cases", choices=sorted(CASES), default="issue")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    p.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement (blocked_autorange)")
    p.add_argument("--compile", action="store_true", help="also time protocl under torch.compile")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--checks", action="store_true",
                   help="also time protocl with the default value checks on (protocl_checked; on with --cases checks)")
    p.add_argument("--before", metavar="SRC", help="also time the protocl package under SRC (an earlier tree's src/) "
                   "in the same rounds, and report now / before")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        spec = json.loads(args.memory_worker)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(measure_memory(Case(**spec["case"]), spec["impl"], spec["device"])))
        return {}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device: expected a CUDA device for {args.device!r}, got none (torch.cuda.is_available() "
                         "is False)")
    torch.set_num_threads(args.threads)
    before = load_before(args.before) if args.before else None
    report = {"machine": machine_description(args.device), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "threads": args.threads, "rounds": args.rounds, "cases": []}
    step = args.cases == "step"
    for case in CASES[args.cases]:
        entry = {"case": dataclasses.asdict(case), "feature_mb": case.feature_mb,
                 "timing": time_case(case, args.device, threads=args.threads, rounds=args.rounds,
                                     min_time=args.min_time, compile=args.compile,
                                     checks=args.checks or args.cases == "checks", step=step, before=before)}
        if not args.no_memory:
            entry["memory"] = {n: memory_in_subprocess(case, n, args.device, args.threads)
                               for n in (("step_before", "step_output") if step else ("release", "protocl"))}
        report["cases"].append(entry)
        print(f"{case.name}: " + ", ".join(f"{n} {v['median_ms']:.1f} ms" for n, v in entry["timing"].items()),
              flush=True)
    report["goals"] = goals(report)
    text = markdown(report) + before_table(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device.split(":")[0]
    stem = f"bench_step_{device}" if step else f"bench_{device}"  # --cases step: its own file
    if before is not None:
        stem += "_vs_before"  # not the tables of docs/benchmarks.md
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(text)
    return report


if __name__ == "__main__":
    main()
