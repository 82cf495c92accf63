r"""GPU checks for a lent H100/H200 (run through ``benchmarks/gpu_check.sh``; finishes in under 8 minutes).

Sections (each one records its result or its error in the JSON, so one failure does not hide the others):

1. ``deeplab``: a DeepLab-V2 ResNet-101 training step on 2 source + 2 target crops of 730x730 (source CE, target
   CE on the hybrid labels, entropy, SGD step), fp32 and bf16 autocast, without and with protocl's
   ``BidirectionalContrast``; median step time, protocl's share of the step and peak memory.
2. ``sync_debug``: the protocl step (forward + backward + EMA) and the whole DeepLab step with protocl under
   ``torch.cuda.set_sync_debug_mode("error")`` and value checks off: any device-to-host sync raises.
3. ``cuda_graph``: the protocl step (forward + backward + EMA updates) captured in a CUDA graph, replayed on new
   inputs copied into the static tensors, compared with eager on a copy of the module, and timed.

``--device cpu --tiny`` runs sections 1 (tiny network and crops) on the CPU, to check the code paths without a
GPU; sections 2 and 3 need CUDA and are reported as skipped there.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

import bench_step

import protocl

IGNORE = 255


def build_deeplab(num_classes: int, tiny: bool) -> torch.nn.Module:
    r"""DeepLab-V2 R101 from ``examples/gta2cs/model.py`` (random init: timing only).

    ``tiny`` builds the examples' ``TinySegNet`` (same ``(logits, features)`` interface, D = 4K) so that the CPU
    check of the code paths takes seconds.
    """
    from examples.gta2cs.model import DeepLabV2, TinySegNet

    return TinySegNet(num_classes, width=16) if tiny else DeepLabV2(num_classes)


def make_batch(crop: int, num_classes: int, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(4, 3, crop, crop, generator=g) * 255
    source_labels = bench_step.blocky_labels(2, crop, num_classes, ignore_fraction=0.05, generator=g)
    static_labels = bench_step.blocky_labels(2, crop, num_classes, ignore_fraction=0.5, generator=g)
    return {"source_images": images[:2].to(device), "target_images": images[2:].to(device),
            "source_labels": source_labels.to(device), "static_labels": static_labels.to(device)}


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = logits.float().log_softmax(dim=1)
    return -(logp.exp() * logp).sum(dim=1).mean()


def train_step_fn(model, optimizer, contrast, batch, *, dtype: torch.dtype | None):
    r"""One training step closure: forward both domains, losses, backward, SGD step; returns the loss."""
    device_type = batch["source_images"].device.type
    label_size = tuple(batch["source_labels"].shape[-2:])

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, features = model(torch.cat([batch["source_images"], batch["target_images"]]))
        logits = F.interpolate(logits.float(), size=label_size, mode="bilinear", align_corners=False)
        src_logits, tgt_logits = logits[:2], logits[2:]
        src_feat, tgt_feat = features[:2], features[2:]
        target_labels = batch["static_labels"]
        loss = F.cross_entropy(src_logits, batch["source_labels"], ignore_index=IGNORE)
        loss = loss + 0.4 * (entropy(src_logits) + 0.3 * entropy(tgt_logits))
        if contrast is not None:
            out = contrast(src_feat, batch["source_labels"], tgt_feat, batch["static_labels"])
            target_labels = out.target_labels
            loss = loss + out.loss
        loss = loss + 0.3 * F.cross_entropy(tgt_logits, target_labels, ignore_index=IGNORE)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


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


def deeplab_section(device: str, tiny: bool, crop: int, repeats: int) -> dict:
    r"""Median DeepLab step time and peak memory, fp32/bf16, without/with protocl (interleaved per precision)."""
    num_classes = 19
    model = build_deeplab(num_classes, tiny).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9, weight_decay=5e-4)
    batch = make_batch(crop, num_classes, device)
    result = {"crop": crop, "tiny": tiny}
    for dtype_name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        if dtype is torch.bfloat16 and device == "cpu" and not tiny:
            continue
        contrast = protocl.BidirectionalContrast(num_classes, model.feature_dim).to(device)
        fns = {"without": train_step_fn(model, optimizer, None, batch, dtype=dtype),
               "with": train_step_fn(model, optimizer, contrast, batch, dtype=dtype)}
        res = {}
        for name, fn in fns.items():
            protocl.set_value_checks(True)
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times = timed(fn, device, warmup=2, repeats=repeats)
            res[name] = {"median_ms": statistics.median(times), "times_ms": times}
            if device == "cuda":
                res[name]["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["protocl_overhead_pct"] = 100 * (res["with"]["median_ms"] / res["without"]["median_ms"] - 1)
        result[dtype_name] = res
        print(f"[gpu_check] deeplab {dtype_name}: without {res['without']['median_ms']:.1f} ms, "
              f"with {res['with']['median_ms']:.1f} ms ({res['protocl_overhead_pct']:+.1f}%)", flush=True)
    return result


def sync_debug_section(device: str, tiny: bool, crop: int) -> dict:
    r"""protocl step and the whole DeepLab step with sync debug mode "error", value checks off."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    case = bench_step.Case("release", 2, 76, 92, 730)
    inputs = bench_step.make_inputs(case, device)
    contrast = protocl.BidirectionalContrast(case.num_classes, case.dim).to(device)
    model = build_deeplab(19, tiny).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-9, momentum=0.9)
    batch = make_batch(crop, 19, device)
    step = train_step_fn(model, optimizer, protocl.BidirectionalContrast(19, model.feature_dim).to(device), batch,
                         dtype=None)
    protocl.set_value_checks(False)
    out = {}
    try:
        for label, fn in (("protocl_step", lambda: _protocl_step(contrast, inputs)), ("deeplab_step", step)):
            fn()  # warm-up outside debug mode (lazy init, cuBLAS handles)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(2):
                    fn()
                out[label] = "no host sync"
            except RuntimeError as exc:
                out[label] = f"host sync: {exc}\n{traceback.format_exc(limit=12)}"
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
    finally:
        protocl.set_value_checks(True)
    print(f"[gpu_check] sync debug: { {k: v.splitlines()[0] for k, v in out.items()} }", flush=True)
    return out


def _protocl_step(contrast, inputs):
    inputs["source_features"].grad = None
    inputs["target_features"].grad = None
    out = contrast(inputs["source_features"], inputs["source_labels"], inputs["target_features"],
                   inputs["static_labels"])
    out.loss.backward()
    return out


def cuda_graph_section(device: str) -> dict:
    r"""Capture the protocl step in a CUDA graph; replay on new inputs; compare with eager; time the replay."""
    if device != "cuda":
        return {"skipped": "needs CUDA"}
    case = bench_step.Case("release", 2, 76, 92, 730)
    static = bench_step.make_inputs(case, device, seed=0)
    fresh = bench_step.make_inputs(case, device, seed=1)
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


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="one block per ResNet stage and small crops (CPU check)")
    p.add_argument("--crop", type=int, default=None)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("expected a CUDA device for --device cuda, got torch.cuda.is_available() == False")
    crop = args.crop or (64 if args.tiny else 730)
    report = {"machine": bench_step.machine_description(args.device), "command": " ".join(sys.argv)}
    sections = (
        ("deeplab", lambda: deeplab_section(args.device, args.tiny, crop, args.repeats)),
        ("sync_debug", lambda: sync_debug_section(args.device, args.tiny, crop)),
        ("cuda_graph", lambda: cuda_graph_section(args.device)),
    )
    for name, fn in sections:
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - a failing section is a result too; keep going
            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=15)}
            print(f"[gpu_check] {name} failed: {exc}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_check_{args.device}{'_tiny' if args.tiny else ''}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"[gpu_check] wrote {path}", flush=True)
    return report


if __name__ == "__main__":
    main()
