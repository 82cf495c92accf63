r"""Profile one implementation of the benchmark with ``torch.profiler`` (CPU or CUDA) and print/save the tables.

    python benchmarks/profile_step.py [--impl protocl_step-nochecks] [--case release] [--iters 5] [--threads 1]

Two tables: operators by self time with input shapes, and operators grouped by the Python frames of protocl that
called them (``--stack``), which names the protocl function responsible for each cost.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_step


def attribute_protocl_functions() -> list[str]:
    r"""Wrap the functions that ``protocl.adaptation`` calls in ``record_function`` ranges (profiling only).

    Patches module globals of ``protocl.adaptation`` and ``PrototypeEMA.update_from`` in this process, so that
    the profiler table names the protocl function responsible for each cost. Returns the wrapped names.
    """
    import functools

    from protocl import adaptation
    from protocl.prototypes import PrototypeEMA

    def wrap(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(f"protocl.{name}"):
                return fn(*args, **kwargs)

        return wrapper

    names = []
    for name in ("resize_to_features", "pool_sums", "divide_counts", "domain_bias_calibrate", "dynamic_pseudo_label",
                 "hybrid_fuse", "_presence", "contrastive_terms", "reduce_loss", "_statistics", "check_label_values",
                 "check_features_labels"):
        if hasattr(adaptation, name):
            setattr(adaptation, name, wrap(name, getattr(adaptation, name)))
            names.append(name)
    PrototypeEMA.update_from = wrap("PrototypeEMA.update_from", PrototypeEMA.update_from)
    names.append("PrototypeEMA.update_from")
    return names


def breakdown(case_name: str = "release", *, release_compatible: bool = False, repeats: int = 15) -> list[tuple]:
    r"""Min and median time of each piece of ``BidirectionalContrast.forward``, called as the orchestrator calls it.

    Minimum over repeats is the figure least disturbed by other load on a shared machine. Value checks off.
    Returns rows ``(piece, min_ms, median_ms)``.
    """
    import statistics
    import time

    import protocl.adaptation as A

    case = {c.name: c for c in bench_step.release_cases() + bench_step.quick_cases()}[case_name]
    x = bench_step.make_inputs(case, "cpu")
    m = bench_step.protocl.BidirectionalContrast(case.num_classes, case.dim, release_compatible=release_compatible)
    bench_step.protocl.set_value_checks(False)
    fs, ys, ft, yf = x["source_features"], x["source_labels"], x["target_features"], x["static_labels"]
    K, ig = case.num_classes, 255
    m(fs, ys, ft, yf)  # initialise the EMAs so that calibration does real work
    p_s, n_s = m._pool(fs, ys)
    y_d = A.dynamic_pseudo_label(ft, m.calibrated(p_s.detach()), valid=n_s > 0, threshold=0.7, ignore_index=ig,
                                 size=tuple(yf.shape[-2:]))
    y_t = A.hybrid_fuse(yf, y_d, mode="fill", ignore_index=ig)
    p_t, n_t = m._pool(ft, y_t)
    grid = tuple(fs.shape[-2:])
    cw = (A._presence(ys, grid, K, ig) & A._presence(y_t, grid, K, ig)).float() if release_compatible else None
    pieces = {
        "1 _pool(source)": lambda: m._pool(fs, ys),
        "2 calibrated": lambda: m.calibrated(p_s.detach()),
        "3 dynamic_pseudo_label(size=H,W)": lambda: A.dynamic_pseudo_label(
            ft, p_s.detach(), valid=n_s > 0, threshold=0.7, ignore_index=ig, size=tuple(yf.shape[-2:])),
        "4 hybrid_fuse": lambda: A.hybrid_fuse(yf, y_d, mode="fill", ignore_index=ig),
        "5 _pool(target)": lambda: m._pool(ft, y_t),
        "6 fcl _contrast (fwd)": lambda: m._contrast(ft, p_s, y_t, n_s > 0, cw),
        "6 bcl _contrast (fwd)": lambda: m._contrast(fs, p_t, ys, n_t > 0, None),
        "6 fcl+bcl fwd+bwd": lambda: (m._contrast(ft, p_s, y_t, n_s > 0, cw)
                                      + m._contrast(fs, p_t, ys, n_t > 0, None)).backward(retain_graph=True),
        "7 EMA update_from x2": lambda: (m.source_ema.update_from(p_s.detach(), n_s),
                                         m.target_ema.update_from(p_t.detach(), n_t)),
        "_statistics": lambda: A._statistics(yf, y_d, y_t, n_s > 0, n_t > 0, p_s.sum(), p_t.sum(), ig),
        "whole step fwd+bwd": lambda: m(fs, ys, ft, yf).loss.backward(),
    }
    if release_compatible:
        pieces["_presence x2 (overlap weight)"] = lambda: A._presence(ys, grid, K, ig) & A._presence(y_t, grid, K, ig)
    rows = []
    for name, fn in pieces.items():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - start))
        rows.append((name, min(times), statistics.median(times)))
    bench_step.protocl.set_value_checks(True)
    return rows


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", default="protocl_step-nochecks")
    p.add_argument("--case", default="release")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--stack", action="store_true", help="also group by the calling Python frames")
    p.add_argument("--attribute", action="store_true",
                   help="wrap protocl.adaptation's helpers in record_function ranges (table by protocl function)")
    p.add_argument("--out", type=Path, default=None, help="write the tables to this text file")
    p.add_argument("--breakdown", action="store_true",
                   help="time each piece of BidirectionalContrast.forward separately (min/median), CPU")
    p.add_argument("--release-compatible", action="store_true", help="with --breakdown: the release-compatible path")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        rows = breakdown(args.case, release_compatible=args.release_compatible, repeats=args.iters)
        out = "\n".join(
            [(f"# breakdown of BidirectionalContrast(release_compatible={args.release_compatible}) on {args.case}, "
              f"threads {torch.get_num_threads()}, {args.iters} repeats"), "| piece | min ms | median ms |",
             "| --- | ---: | ---: |"] + [f"| {n} | {a:.2f} | {b:.2f} |" for n, a, b in rows])
        print(out)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(out + "\n")
        return out
    case = {c.name: c for c in bench_step.release_cases() + bench_step.quick_cases()}[args.case]
    impl = {i.name: i for i in bench_step.implementations(compile=True)}[args.impl]
    if args.attribute:
        attribute_protocl_functions()
    inputs = bench_step.make_inputs(case, args.device)
    fn = impl.build(case, inputs, args.device)
    bench_step.protocl.set_value_checks(impl.checks)
    for _ in range(2):
        fn()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities, record_shapes=True, with_stack=args.stack) as prof:
        for _ in range(args.iters):
            fn()
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    text = [f"# {args.impl} on {args.case} ({args.device}, threads {torch.get_num_threads()}, {args.iters} iters)"]
    text.append(prof.key_averages(group_by_input_shape=True).table(
        sort_by=sort, row_limit=args.rows, max_name_column_width=40, max_shapes_column_width=70))
    if args.attribute:
        rows = [e for e in prof.key_averages() if e.key.startswith("protocl.") or e.key.startswith("autograd::engine")]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        text.append(f"\nprotocl functions (CPU total per call, inclusive; whole profile {total / 1e3 / args.iters:.1f} ms/iter):")
        for e in sorted(rows, key=lambda e: -e.cpu_time_total)[: args.rows]:
            text.append(f"  {e.key:<45} {e.cpu_time_total / 1e3 / args.iters:9.2f} ms/iter  calls/iter {e.count / args.iters:g}")
    if args.stack:
        text.append(prof.key_averages(group_by_stack_n=6).table(
            sort_by=sort, row_limit=args.rows, max_name_column_width=40, max_src_column_width=110))
    out = "\n".join(text)
    print(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(out)
    return out


if __name__ == "__main__":
    main()
