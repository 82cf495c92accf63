"""Memory of train_daformer.py's step per card, estimated without a GPU (docs/daformer.md, "Memory").

On the meta device (shapes only, no compute) the network's forward runs under ``saved_tensors_hooks``, which see
every tensor autograd keeps for the backward: their bytes (each storage once) are the activations of one training
forward. The step's peak is estimated as

    static (student fp32 + its gradients + AdamW's two moments + the EMA teacher + the frozen ImageNet encoder)
    + the activations of one forward of 2 crops (the three backward passes free each graph before the next)

plus the allocator's slack, which only a GPU measures (``benchmarks/gpu_check.sh`` runs
``benchmarks/daformer_cost.py`` for the measured peak at 512² with MiT-B5). fp32 only: autocast does not run on
the meta device; bf16 stores the matmul and convolution outputs in half the bytes (the norms and softmaxes in fp32).

    python -m benchmarks.daformer_memory            # MiT-B0...B5 at 512x512, 2 crops, K = 19
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from uda.daformer_net import DAFormerNet
from uda.mit import MIT_VARIANTS

GIB = 2**30


def activation_bytes(net: torch.nn.Module, batch: int, crop: int) -> int:
    """Bytes of the tensors autograd saves in one forward of ``batch`` crops (each storage counted once)."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        key = (id(t.untyped_storage()) if t.device.type != "meta" else id(t), t.data_ptr() if t.device.type != "meta"
               else 0)
        seen[key] = t.numel() * t.element_size()
        return t

    images = torch.rand(batch, 3, crop, crop, device="meta") * 255
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = net(images)
        logits.sum()
    return sum(seen.values())


def estimate(arch: str, crop: int, batch: int, num_classes: int) -> dict:
    with torch.device("meta"):
        net = DAFormerNet(arch, num_classes).train()
    params = sum(p.numel() for p in net.parameters())
    encoder = sum(p.numel() for p in net.backbone.parameters())
    static = 4 * (5 * params + encoder)  # fp32: student, grads, 2 AdamW moments, teacher; + the frozen encoder
    act = activation_bytes(net, batch, crop)
    return {"arch": arch, "crop": crop, "batch": batch, "params_m": params / 1e6, "static_gib": static / GIB,
            "activations_gib": act / GIB, "estimate_gib": (static + act) / GIB}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", nargs="+", default=list(MIT_VARIANTS))
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--batch", type=int, default=2, help="crops per forward (2: DAFormer's 2 + 2 in two passes)")
    p.add_argument("--num-classes", type=int, default=19)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    rows = [estimate(a, args.crop, args.batch, args.num_classes) for a in args.archs]
    print("| arch | params (M) | static fp32 (GiB) | activations of one forward, fp32 (GiB) | estimate (GiB) |\n"
          "|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arch']} | {r['params_m']:.1f} | {r['static_gib']:.2f} | {r['activations_gib']:.2f} | "
              f"{r['estimate_gib']:.2f} |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "daformer_memory.json").write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
