r"""GTA5 (or SYNTHIA) -> Cityscapes with bi-directional prototype contrast (protocl's reference pipeline, spec §4).

Without dataset paths it runs the embedded demo: a small synthetic two-domain dataset is written in the
GTA5 (or, with ``--source synthia``, SYNTHIA) and Cityscapes layouts (flat rendering -> textured, noisy,
colour-shifted "real" images), a tiny CNN is trained source-only, then adapted, in a few minutes on a CPU:

    python examples/train_gta2cs.py
    python examples/train_gta2cs.py --source synthia --amp bf16

On the real datasets (DeepLab-V2 ResNet-101, the paper's settings are the defaults):

    python examples/train_gta2cs.py --gta5-root /data/GTA5 --cityscapes-root /data/cityscapes \
        --init resnet101-imagenet.pth --out runs/gta2cs --device cuda --amp bf16
    python examples/train_gta2cs.py --synthia-root /data/RAND_CITYSCAPES --cityscapes-root /data/cityscapes ...
    torchrun --nproc_per_node=4 examples/train_gta2cs.py ... (the same arguments)

The last line printed is ``target mIoU: source-only X.XX -> adapted Y.YY`` (for SYNTHIA: over the 16 shared
classes; metrics.json also has ``miou13``). See docs/examples.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# paper settings for DeepLab-V2 (spec §4); the tiny demo's own budget
DEFAULTS = {
    "deeplabv2": {"source_iters": 20000, "rounds": 10, "round_iters": 10000, "batch_size": 2, "crop": 730,
                  "resize": 850, "eval_size": (1460, 730), "lr": 7.5e-5, "source_lr": 2.5e-4, "ema_momentum": 0.999,
                  "workers": 4, "log_every": 50, "ckpt_every": 1000, "threshold": 0.7, "threads": None},
    "tiny": {"source_iters": 500, "rounds": 3, "round_iters": 200, "batch_size": 4, "crop": 48, "resize": 64,
             "eval_size": (128, 64), "lr": 2e-3, "source_lr": 5e-3, "ema_momentum": 0.99, "workers": 0,
             "log_every": 50, "ckpt_every": 200, "threshold": 0.9, "threads": 1},
}


def _size(text: str) -> tuple[int, int]:
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 1460x730, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--source", choices=("gta5", "synthia"),
                   help="source dataset (default: synthia when --synthia-root is given, else gta5)")
    d.add_argument("--gta5-root", help="GTA5 root (images/, labels/); omit the roots for the embedded demo")
    d.add_argument("--synthia-root", help="SYNTHIA-RAND-CITYSCAPES root (RGB/, GT/LABELS/ 16-bit PNGs); evaluated "
                                          "over the 16 shared classes (miou16) and 13 (miou13)")
    d.add_argument("--cityscapes-root", help="Cityscapes root (leftImg8bit/, gtFine/)")
    d.add_argument("--demo-root", help="where the demo dataset is written (default: <out>/demo_data)")
    d.add_argument("--out", default="runs/gta2cs", help="output directory (checkpoints, figures, log, metrics.json)")
    d.add_argument("--batch-size", type=int, help="source and target images per step and rank (2 + 2 in the paper)")
    d.add_argument("--crop", type=int, help="random square crop (730)")
    d.add_argument("--resize", type=int, help="short side before random scaling (850)")
    d.add_argument("--scales", type=float, nargs="+", default=[0.8, 1.0, 1.2], help="random scale choices")
    d.add_argument("--eval-size", type=_size, help="evaluation input WIDTHxHEIGHT (1460x730)")
    d.add_argument("--workers", type=int, help="DataLoader worker processes")
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("deeplabv2", "tiny"), help="default: tiny for the demo, deeplabv2 otherwise")
    m.add_argument("--init", help="ImageNet ResNet-101 weights (torchvision or DeepLab init layout); never downloaded")
    m.add_argument("--features", choices=("aspp", "layer4"), default="aspp",
                   help="contrast features: ASPP branch outputs (D=4K) or layer4 + 1x1 projection")
    m.add_argument("--proj-dim", type=int, default=256, help="D of the layer4 projection")
    t = p.add_argument_group("schedule")
    t.add_argument("--source-iters", type=int, help="stage 1 iterations")
    t.add_argument("--rounds", type=int, help="stage 2 rounds (static labels regenerated at each start)")
    t.add_argument("--round-iters", type=int, help="iterations per round")
    t.add_argument("--lr", type=float, help="stage 2 backbone lr (classifier x10), poly per round, halved per round")
    t.add_argument("--source-lr", type=float, help="stage 1 backbone lr (classifier x10), poly")
    t.add_argument("--control", action=argparse.BooleanOptionalAction,
                   help="also continue source-only training from stage 1 for the stage 2 budget, a baseline with "
                        "the same iterations (default: on for the demo, off otherwise)")
    t.add_argument("--source-checkpoint",
                   help="skip stage 1: start stage 2 from the model weights of this file (a source_only.pt, or any "
                        "checkpoint with a 'model' entry); the same-budget control starts from them too")
    t.add_argument("--stage1-best-on-target-val", action="store_true",
                   help="the release's stage-1 selection: keep the stage-1 checkpoint with the best target-val mIoU "
                        "(evaluated every --ckpt-every iterations). It peeks at target labels: off by default")
    c = p.add_argument_group("method")
    c.add_argument("--fcl-weight", type=float, default=0.1)
    c.add_argument("--bcl-weight", type=float, default=0.1)
    c.add_argument("--temperature", type=float, default=0.1)
    c.add_argument("--ema-momentum", type=float)
    c.add_argument("--threshold", type=float, help="cosine threshold of the dynamic labels (0.7; tiny demo 0.9)")
    c.add_argument("--fuse", choices=("fill", "agree", "dynamic_first"), default="fill")
    c.add_argument("--proportion", type=float, default=0.1, help="class-balanced / per-image static label proportion")
    c.add_argument("--gate-dynamic", choices=("none", "prediction", "agreement", "either"), default="none",
                   help="which hybrid labels the target CE trains on (FCL/BCL unchanged): 'none' all (the paper's "
                        "rule, default); 'prediction' a dynamic fill-in only where the classifier's argmax agrees; "
                        "'agreement' a dynamic fill-in of class c only if the batch's dynamic c labels agree with "
                        "its static labels on >= half of the pixels carrying both; 'either' a fill-in kept by "
                        "either rule (docs/examples.md: none helps on every shift)")
    c.add_argument("--no-contrastive", action="store_true", help="ablation: no FCL/BCL")
    c.add_argument("--no-dynamic", action="store_true", help="ablation: static labels only (no dynamic/hybrid)")
    c.add_argument("--no-calibration", action="store_true", help="ablation: no domain-bias calibration")
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (torchrun picks LOCAL_RANK)")
    r.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast the network forward (losses stay fp32); fp16 adds a GradScaler, checkpointed")
    r.add_argument("--value-checks", choices=("first", "always"), default="first",
                   help="protocl's label-value checks (one host sync per label map): on the first step of each "
                        "stage and round only, or on every step")
    r.add_argument("--sync-debug", action="store_true",
                   help="run the training steps (not the first of a stage/round, not logging) under "
                        "torch.cuda.set_sync_debug_mode('error'): any host sync raises (CUDA only)")
    r.add_argument("--diagnostics", action=argparse.BooleanOptionalAction,
                   help="per-class coverage and precision of static/dynamic/hybrid labels against target train "
                        "ground truth, logged and in metrics.json (reads target labels; never trained on; "
                        "default: on for the demo, off otherwise)")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <out>/tensorboard")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", help="checkpoint to continue from (e.g. <out>/checkpoint.pt)")
    r.add_argument("--log-every", type=int)
    r.add_argument("--ckpt-every", type=int, help="checkpoint every N iterations (and at each stage/round end)")
    r.add_argument("--threads", type=int,
                   help="torch CPU threads (tiny: 1, its tensors are too small to gain from more and one thread "
                        "stays fast on a busy machine; deeplabv2: torch's choice)")
    r.add_argument("--pseudo-cache-mb", type=int, default=512, help="RAM for caching logits between threshold passes")
    r.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # test hook: simulate a crash
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill arch-dependent defaults and the embedded demo dataset; validate the combination."""
    if args.source is None:
        args.source = "synthia" if args.synthia_root is not None else "gta5"
    source_root, other = ("gta5_root", "synthia_root") if args.source == "gta5" else ("synthia_root", "gta5_root")
    if getattr(args, other) is not None:
        raise SystemExit(f"error: --{other.replace('_', '-')} given with --source {args.source}")
    demo = getattr(args, source_root) is None and args.cityscapes_root is None
    if (getattr(args, source_root) is None) != (args.cityscapes_root is None):
        raise SystemExit(f"error: give both --{source_root.replace('_', '-')} and --cityscapes-root (or neither "
                         "for the embedded demo)")
    if args.arch is None:
        args.arch = "tiny" if demo else "deeplabv2"
    for key, value in DEFAULTS[args.arch].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.round_iters < 1 or args.source_iters < 1:
        raise SystemExit("error: --source-iters, --rounds and --round-iters must be >= 1")
    if demo:
        from gta2cs.synthetic import write_demo_dataset

        root = Path(args.demo_root or Path(args.out) / "demo_data")
        if int(os.environ.get("RANK", "0")) == 0:
            write_demo_dataset(root, seed=args.seed, source=args.source)
        else:  # other ranks wait for rank 0's copy
            import time

            while not (root / ".complete").is_file():
                time.sleep(0.2)
        setattr(args, source_root, str(root / args.source))
        args.cityscapes_root = str(root / "cityscapes")
    if args.control is None:
        args.control = demo
    if args.diagnostics is None:
        args.diagnostics = demo
    args.demo = demo
    return args


def main(argv: list[str] | None = None) -> int:
    args = resolve(build_parser().parse_args(argv))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from gta2cs import dist
    from gta2cs.trainer import Trainer

    try:
        try:  # set-up errors (missing dataset roots, bad --init or --resume files) end with a clear message
            trainer = Trainer(args)
            if args.resume:
                trainer.resume(args.resume)
            elif args.source_checkpoint:
                trainer.start_from_source(args.source_checkpoint)
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return trainer.run()
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
