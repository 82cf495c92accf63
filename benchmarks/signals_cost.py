r"""What the label-free signals cost on every stage-2 step (issue 34): the classifier's prediction at label
resolution and ``uda.signals.step_counts``, before and after issue 34, one thread (the demo's ``--threads 1``).

    python -m benchmarks.signals_cost                    # demo shapes, the demo step, DeepLab shapes
    python -m benchmarks.signals_cost --no-deeplab --out benchmarks/results/issue34/signals_cost.md

- ``prediction``: before ``up_t.argmax(1)`` (a strided reduction over K, slow on the CPU); now
  ``uda.signals.prediction`` (``max(1).indices``: the same index, ties and NaN included).
- ``step_counts``: before the implementation kept below (:func:`step_counts_before`: one int64 scatter of three
  per-pixel codes built from comparison maps, then ``topk`` and ``argmax`` over the cosines); now
  ``uda.signals.step_counts`` (three joint label histograms, no comparison map; one ``max`` over the cosines).
- ``demo step``: ``train_gta2cs.adapt_step`` of a run built as the tests build one (the tiny CNN at its defaults:
  batch 4, crop 48, K = 19, D = 76, threshold 0.9), on fixed synthetic batches, with the before functions patched
  into ``uda.signals`` (before) or as shipped (now). The components are timed on the tensors of that step.
- DeepLab shapes: B = 2, K = 19, labels 730², cosines 92² (logits at 92² upsampled bilinearly to 730²).

Timing: ``--repeats`` interleaved rounds (each times every variant once in turn, so that machine load hits all
alike); the median per variant, by default of the thread's CPU time (``--clock cpu``: with one torch thread the
calling thread does all the work, forward and backward, and a loaded machine's time slices taken by other
processes are not counted; ``--clock wall`` for elapsed time). The share of the step is the component's median
over the step's median.
Outputs of before and now are checked equal (``torch.equal``) before timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from uda import signals

from protocl import IGNORE_INDEX

K = 19


def argmax_before(logits: torch.Tensor) -> torch.Tensor:
    """The step's prediction before issue 34."""
    return logits.argmax(1)


@torch.no_grad()
def step_counts_before(static, dynamic, hybrid, prediction, sims, threshold: float, num_classes: int):
    """``uda.signals.step_counts`` as it was before issue 34 (issue 25's: three label maps, one int64 scatter)."""
    K, ig = num_classes, IGNORE_INDEX
    K1 = K + 1
    has_s = static != ig
    d = torch.where(dynamic != ig, dynamic, K) * 8 + has_s + 2 * (static == dynamic) + 4 * (prediction == dynamic)
    h = torch.where(hybrid != ig, hybrid, K) * 2 + (prediction == hybrid) + 8 * K1
    st = torch.where(has_s, static, K) + 10 * K1
    index = torch.cat([d.flatten(), h.flatten(), st.flatten()])
    hist = torch.zeros(11 * K1, dtype=torch.int64, device=index.device)
    hist.scatter_add_(0, index, torch.ones((), dtype=torch.int64, device=index.device).expand(index.numel()))
    by_d = hist[:8 * K1].view(K1, 2, 2, 2)[:K]
    by_h = hist[8 * K1:10 * K1].view(K1, 2)[:K]
    counts = torch.stack([
        by_d[:, :, :, 1].sum((1, 2)), by_d[:, :, 1].sum((1, 2)), by_d.sum((1, 2, 3)), by_d[:, 1].sum((1, 2)),
        by_h.sum(1), by_h[:, 1], hist[10 * K1:10 * K1 + K],
    ]).double()
    top = sims.cosine.float().flatten(2).topk(min(2, K), dim=1).values
    best = top[:, 0]
    second = top[:, 1].clamp_min(-1.0) if K > 1 else torch.full_like(best, -1.0)
    cell_class = torch.where(best > threshold, sims.cosine.flatten(2).argmax(1), K).flatten()
    margin = torch.nan_to_num(best - second, nan=0.0, posinf=0.0, neginf=0.0).flatten().double()
    index = torch.stack([cell_class, cell_class]) + torch.arange(2, device=margin.device)[:, None] * K1  # signals._scatter as it was
    cells = torch.zeros(2 * K1, dtype=torch.float64, device=margin.device).scatter_add_(0, index.flatten(),
                                                                  torch.stack([margin, torch.ones_like(margin)]).flatten())
    return torch.cat([counts[:6], cells.view(2, K1)[:, :K], counts[6:]])


CLOCKS = {"cpu": time.thread_time, "wall": time.perf_counter}
clock = CLOCKS["cpu"]


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median ms of each zero-argument callable over ``repeats`` rounds, each round calling every one in turn."""
    for fn in variants.values():  # warm-up
        fn()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def synthetic_inputs(batch: int, size: int, cells: int, seed: int = 0):
    """Logits at ``cells``² upsampled to ``size``², label maps (region-free, random) and cosines of a step."""
    g = torch.Generator().manual_seed(seed)
    logits = F.interpolate(torch.randn(2 * batch, K, cells, cells, generator=g), size=(size, size),
                           mode="bilinear", align_corners=False)[batch:]  # up_t: the target half of ``up``
    shape = (batch, size, size)
    static = torch.where(torch.rand(shape, generator=g) < 0.4, torch.randint(0, K, shape, generator=g), IGNORE_INDEX)
    dynamic = torch.where(torch.rand(shape, generator=g) < 0.7, torch.randint(0, K, shape, generator=g), IGNORE_INDEX)
    hybrid = torch.where(static != IGNORE_INDEX, static, dynamic)
    valid = torch.rand(batch, K, generator=g) < 0.8
    cosine = torch.rand(batch, K, cells, cells, generator=g) * 2 - 1
    cosine = torch.where(valid[:, :, None, None], cosine, torch.full_like(cosine, -float("inf")))
    return logits, (static, dynamic, hybrid), signals.Similarities(cosine, valid)


def component_rows(logits, labels, sims, threshold: float, repeats: int) -> dict[str, float]:
    pred = logits.argmax(1)
    assert torch.equal(signals.prediction(logits), pred)
    args = (*labels, pred, sims, threshold, K)
    assert torch.equal(signals.step_counts(*args), step_counts_before(*args))
    return interleaved({
        "prediction before": lambda: argmax_before(logits), "prediction now": lambda: signals.prediction(logits),
        "step_counts before": lambda: step_counts_before(*args), "step_counts now": lambda: signals.step_counts(*args),
    }, repeats)


def demo_step(repeats: int) -> tuple[dict[str, float], tuple]:
    """Median ms of the demo's ``adapt_step`` before / now, and the tensors its signals line saw."""
    import train_gta2cs
    from uda import options
    from uda.demo import write_demo_dataset

    scratch = tempfile.TemporaryDirectory(prefix="signals_cost_", ignore_cleanup_errors=True)
    tmp = Path(scratch.name)
    with contextlib.redirect_stdout(io.StringIO()):
        gta, cs = write_demo_dataset(tmp / "data", seed=3, source_images=4, target_train=4, target_val=2,
                                     source_size=(72, 40), target_size=(64, 32))
        run = train_gta2cs.setup(options.parse_args(["--gta5-root", str(gta), "--cityscapes-root", str(cs),
                                                     "--arch", "tiny", "--out", str(tmp / "out"), "--workers", "0",
                                                     "--threads", "1"]))
    b, c = run.args.batch_size, run.args.crop
    g = torch.Generator().manual_seed(0)
    src = {"image": torch.rand(b, 3, c, c, generator=g) * 255, "label": torch.randint(0, K, (b, c, c), generator=g)}
    tgt = {"image": torch.rand(b, 3, c, c, generator=g) * 255,
           "static": torch.where(torch.rand(b, c, c, generator=g) < 0.4, torch.randint(0, K, (b, c, c), generator=g),
                                 IGNORE_INDEX)}
    now = (signals.prediction, signals.step_counts)
    seen = {}

    def record_prediction(logits):
        seen["logits"] = logits.detach().clone()
        return now[0](logits)

    def record_counts(*args):
        seen["args"] = args
        return now[1](*args)

    def step(kind: str):
        signals.prediction, signals.step_counts = {"before": (argmax_before, step_counts_before), "now": now,
                                                   "record": (record_prediction, record_counts)}[kind]
        try:
            train_gta2cs.adapt_step(run, src, tgt)
        finally:
            signals.prediction, signals.step_counts = now

    for _ in range(5):
        step("now")
    step("record")
    ms = interleaved({"demo step before": lambda: step("before"), "demo step now": lambda: step("now")}, repeats)
    static, dynamic, hybrid, _, sims, threshold, _ = seen["args"]
    scratch.cleanup()
    return ms, (seen["logits"], (static, dynamic, hybrid), sims, threshold)


def table(rows: list[tuple[str, dict[str, float], float | None]]) -> str:
    lines = ["| shapes | component | before ms | now ms | now / before | share of the step before | share now |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for shapes, ms, step in rows:
        for part in ("prediction", "step_counts", "both"):
            if part == "both":
                old = ms["prediction before"] + ms["step_counts before"]
                new = ms["prediction now"] + ms["step_counts now"]
            else:
                old, new = ms[f"{part} before"], ms[f"{part} now"]
            if step is None:
                shares = "- | -"
            else:
                shares = f"{100 * old / step[0]:.1f} % | {100 * new / step[1]:.1f} %"
            lines.append(f"| {shapes} | {part} | {old:.3f} | {new:.3f} | {new / old:.2f} | {shares} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=400, help="interleaved rounds at the demo's shapes")
    p.add_argument("--step-repeats", type=int, default=60, help="interleaved rounds of the demo step")
    p.add_argument("--deeplab-repeats", type=int, default=7, help="interleaved rounds at the DeepLab shapes")
    p.add_argument("--no-step", action="store_true", help="no demo step (components on synthetic demo inputs)")
    p.add_argument("--no-deeplab", action="store_true", help="leave out the DeepLab shapes")
    p.add_argument("--clock", choices=tuple(CLOCKS), default="cpu",
                   help="cpu: the thread's CPU time (one thread does all the work; time other processes take from "
                        "this one is not counted), wall: elapsed time")
    p.add_argument("--out", type=Path, help="also write the Markdown here")
    args = p.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    torch.set_num_threads(1)
    load = [round(v, 2) for v in os.getloadavg()]
    rows, notes = [], []
    if args.no_step:
        logits, labels, sims = synthetic_inputs(4, 48, 12)
        rows.append(("demo (B=4, K=19, 48², cosines 12², synthetic)",
                     component_rows(logits, labels, sims, 0.9, args.repeats), None))
    else:
        step_ms, (logits, labels, sims, threshold) = demo_step(args.step_repeats)
        ms = component_rows(logits, labels, sims, threshold, args.repeats)
        rows.append(("demo (B=4, K=19, 48², cosines 12², the step's tensors)", ms,
                     (step_ms["demo step before"], step_ms["demo step now"])))
        notes.append(f"Demo step (`train_gta2cs.adapt_step`, tiny CNN, signals on): before "
                     f"{step_ms['demo step before']:.2f} ms, now {step_ms['demo step now']:.2f} ms (median of "
                     f"{args.step_repeats} interleaved rounds; a difference this small is within the step's run-to-run "
                     f"noise, the component rows resolve it).")
    if not args.no_deeplab:
        logits, labels, sims = synthetic_inputs(2, 730, 92)
        rows.append(("DeepLab (B=2, K=19, 730², cosines 92², synthetic)",
                     component_rows(logits, labels, sims, 0.7, args.deeplab_repeats), None))
    text = "\n".join([
        "# The label-free signals' cost per stage-2 step (issue 34, cpu)", "",
        f"Machine: {platform.processor() or platform.machine()}, torch threads 1, torch {torch.__version__}, "
        f"Python {platform.python_version()}; load average at start {load}.",
        "Command: `python -m benchmarks.signals_cost " + " ".join(sys.argv[1:] if argv is None else argv) + "`.", "",
        f"Median ms ({'thread CPU time' if args.clock == 'cpu' else 'wall-clock time'}) over {args.repeats} (demo) "
        f"/ {args.deeplab_repeats} (DeepLab) interleaved rounds; before and "
        "now give equal outputs (checked). prediction: `up_t.argmax(1)` before, `signals.prediction(up_t)` "
        "(`max(1).indices`) now; step_counts: issue 25's before, issue 34's now; both: their sum.", "",
        *[n + "\n" for n in notes], table(rows), ""])
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return text


if __name__ == "__main__":
    main()
