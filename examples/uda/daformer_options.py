r"""Command-line options of the DAFormer-class trainer (``examples/train_daformer.py``): parsing only.

The data, model and run groups are ``train_gta2cs.py``'s (:mod:`uda.options`); the schedule and the recipe are
DAFormer's published defaults (:data:`RECIPE`, docs/daformer.md cites the config files), scaled down for the
embedded demo. The shared layer (:mod:`uda.run`, :mod:`uda.state`, :mod:`uda.report`) reads the schedule as one
phase of ``--iters`` iterations: ``source_iters = 0``, ``rounds = 1``, ``round_iters = --iters`` (:data:`FIXED`).
"""

from __future__ import annotations

import argparse

from . import options
from .daformer_net import FEATURES
from .mit import MIT_VARIANTS
from .teacher import ALPHA, FDIST_LAMBDA, FDIST_SCALE_MIN_RATIO, MASK_BLOCK, MASK_RATIO, PSEUDO_THRESHOLD

RECIPE = {"iters": 40000, "warmup_iters": 1500, "lr": 6e-5, "batch_size": 2, "crop": 512, "source_resize": 720,
          "resize": 512, "eval_size": (1024, 512), "workers": 4, "log_every": 50, "ckpt_every": 2000,
          "rcs_min_pixels": 3000, "threads": None, "contrast_start": 3000, "ema_momentum": 0.999, "threshold": 0.7}
"""DAFormer's ``gta2cs_uda_warm_fdthings_rcs_croppl_a999_daformer_mitb5`` settings (GTA5 1280x720 and Cityscapes
1024x512 by their short side, 512 crops, whole-image evaluation at 1024x512)."""
DEMO = {"iters": 600, "warmup_iters": 25, "lr": 6e-4, "batch_size": 2, "crop": 64, "source_resize": 72, "resize": 64,
        "eval_size": (128, 64), "workers": 0, "log_every": 50, "ckpt_every": 200, "rcs_min_pixels": 12,
        "threads": 1, "contrast_start": 45, "ema_momentum": 0.99, "threshold": 0.7}
"""The embedded demo (128x72 source, 128x64 target images): MiT-B0 from scratch on 64x64 crops; the warm-up and
``rcs_min_pixels`` scaled with the budget and the image area (3000 of GTA5's 1914x1052 pixels ~ 12 of 128x72);
one torch thread (as the tiny demo's: on a busy 2-core machine two threads were 17x slower per step); the lr
is 10x DAFormer's for a network from scratch, set once and not tuned (docs/daformer.md); ``--contrast``'s start
at the same share of the run as SePiCo's 3000 of 40000 (7.5 %) and its prototype EMA momentum as the tiny demo's
(0.99: fewer, noisier steps)."""
DEFAULT_ARCH = "mit-b5"
DEMO_ARCH = "mit-b0"

FIXED = {"source_iters": 0, "rounds": 1, "round_decisions": "off", "round_score": "flip_agreement",
         "score_tolerance": 0.0, "score_images": 64, "score_memory_mb": 512, "fallback": "source", "stage1_best_on_target_val": False, "source_checkpoint": None,
         "peer_classifier": None, "diagnostics": False, "signals": False, "no_contrastive": False,
         "rectify": False, "target_ce": "hybrid", "scales": [1.0], "value_checks": "first"}
"""What the shared layer reads and this recipe does not vary (no stage 1, one phase, no round decisions, no
pseudo-label diagnostics of the contrast); ``scales``: DAFormer resizes to one scale."""

MIC_MIN_GRID = 8
"""``--mic``: at least 8 x 8 mask blocks per crop. On a coarser grid a whole crop is masked now and then (4 x 4 at
ratio 0.7: 0.3 % of crops), a constant image; a MiT from scratch (zero patch-embedding bias) turns it into exactly
zero tokens, whose LayerNorm gradients (x 1 / sqrt(eps) a layer) overflow to NaN."""
CITYSCAPES_ROWS = (15, 120)  # DAFormer's ignored top/bottom rows of a 512-row Cityscapes crop


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="DAFormer-class self-training (MiT + DAFormer's decoder, EMA teacher, "
                                            "ClassMix, rare-class sampling, ImageNet feature distance; MIC as an "
                                            "option) on protocl's pipeline: every source and target of "
                                            "train_gta2cs.py, your classes, resume, torchrun.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = options.add_data_options(p, out="runs/daformer")
    d.add_argument("--source-resize", type=int, help="the source's short side before cropping (GTA5 1280x720: 720; "
                                                     "--resize is the target's, 512)")
    options.add_model_options(p, f"{DEMO_ARCH} for the demo (from scratch), {DEFAULT_ARCH} otherwise; deeplabv2 and "
                                 "tiny also train under this recipe")
    t = p.add_argument_group("schedule (DAFormer: AdamW, linear warm-up, then poly 1.0)")
    t.add_argument("--iters", type=int, help="training iterations (40000; demo 600)")
    t.add_argument("--warmup-iters", type=int, help="linear warm-up iterations (1500)")
    t.add_argument("--lr", type=float, help="encoder lr (6e-5; the decoder x10); AdamW, weight decay 0.01")
    t.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                   help="also train the same network on source alone for the same iterations from the same "
                        "initial weights: the source-only number of the last line (doubles the cost)")
    r = p.add_argument_group("recipe (each part can be switched off for ablations)")
    r.add_argument("--teacher-alpha", type=float, default=ALPHA, help="EMA teacher: alpha_t = min(1 - 1/(t+1), A)")
    r.add_argument("--pseudo-threshold", type=float, default=PSEUDO_THRESHOLD,
                   help="the pseudo-label weight is the batch's share of pixels at least this confident")
    r.add_argument("--no-pseudo-weight", action="store_true", help="ablation: pseudo-label weight 1 everywhere")
    r.add_argument("--ignore-rows", type=int, nargs=2, metavar=("TOP", "BOTTOM"),
                   help="crop rows with pseudo-label weight 0 (Cityscapes: 15 120 at --resize 512, scaled with "
                        "--resize; other targets: 0 0)")
    r.add_argument("--no-mix", action="store_true", help="ablation: no ClassMix (pseudo labels on target crops)")
    r.add_argument("--jitter", type=float, default=0.2, help="colour-jitter strength of the mixed images (0: off)")
    r.add_argument("--jitter-p", type=float, default=0.2, help="DAFormer's color_jitter_probability (a skip threshold)")
    r.add_argument("--no-blur", action="store_true", help="ablation: no Gaussian blur of the mixed images")
    r.add_argument("--rcs-temperature", type=float, default=0.01, help="rare-class sampling T (0: off)")
    r.add_argument("--rcs-min-pixels", type=int, help="RCS: a file counts for a class above this many pixels")
    r.add_argument("--rcs-min-crop-ratio", type=float, default=0.5, help="RCS: crop re-drawn until it holds "
                                                                         "min-pixels x this of the class")
    r.add_argument("--fd-lambda", type=float, default=FDIST_LAMBDA,
                   help="ImageNet feature distance on the thing classes (0: off; off without --init)")
    r.add_argument("--fd-scale-min-ratio", type=float, default=FDIST_SCALE_MIN_RATIO)
    r.add_argument("--thing-classes", nargs="+",
                   help="feature distance classes (names; default: the class table's of Cityscapes' ten things)")
    r.add_argument("--mic", action="store_true", help="MIC's masked-image consistency on the target crops")
    r.add_argument("--mic-block", type=int, default=MASK_BLOCK, help="MIC patch size (pixels)")
    r.add_argument("--mic-ratio", type=float, default=MASK_RATIO, help="MIC masked share of patches")
    r.add_argument("--mic-weight", type=float, default=1.0, help="MIC loss weight")
    add_contrast_options(p)
    options.add_run_options(p)
    return p


def add_contrast_options(p: argparse.ArgumentParser) -> None:
    """``--contrast`` and its settings (issue 33; docs/daformer.md, "protocl's contrast on this trainer")."""
    c = p.add_argument_group("protocl's contrast (FCL + BCL with EMA prototypes, calibration and hybrid labels) as "
                             "an add-on to the recipe")
    c.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=False,
                   help="add protocl's BidirectionalContrast to each step from --contrast-start on (off by "
                        "default: on three toy shifts it stayed within seed noise of the recipe; docs/daformer.md)")
    c.add_argument("--contrast-features", choices=FEATURES, default="fused",
                   help="what the contrast reads: the decoder's fused 256-d map (before the classifier; CLUDA's) or "
                        "SePiCo's projection of the four encoder stages (1x1 -> 256 -> BN/ReLU -> 1x1 -> "
                        "--contrast-dim; its own parameters, 10x lr like the decoder)")
    c.add_argument("--contrast-dim", type=int, default=512, help="D of --contrast-features projection (SePiCo: 512)")
    c.add_argument("--contrast-target", choices=("mixed", "clean"), default="mixed",
                   help="the target features: those of the mixed image the student already sees (labels: the "
                        "teacher's, mixed as the image is), or an extra student pass on the clean target crop (one "
                        "more forward and backward)")
    c.add_argument("--contrast-labels", choices=("recipe", "class-balanced"), default="recipe",
                   help="which teacher pixels are confident enough to be static labels: the recipe's "
                        "--pseudo-threshold (0.968), or protocl's class-balanced thresholds of the batch plus each "
                        "image's top --proportion")
    c.add_argument("--proportion", type=float, default=0.1,
                   help="--contrast-labels class-balanced: each class's share (and each image's top share) kept")
    c.add_argument("--fcl-weight", type=float, default=0.1, help="lambda_FCL")
    c.add_argument("--bcl-weight", type=float, default=0.1, help="lambda_BCL")
    c.add_argument("--temperature", type=float, default=0.1,
                   help="tau of FCL/BCL, a divisor of cosines (SePiCo's 100 on unit features gives logits of "
                        "+-0.01: a near-uniform softmax)")
    c.add_argument("--contrast-start", type=int, help="first iteration with the contrast (SePiCo: 3000 of 40000; "
                                                      "demo 45 of 600)")
    c.add_argument("--ema-momentum", type=float, help="the prototype EMAs' momentum (0.999; demo 0.99)")
    c.add_argument("--threshold", type=float, help="cosine threshold of the dynamic labels (0.7)")
    c.add_argument("--fuse", choices=("fill", "agree", "dynamic_first"), default="fill")
    c.add_argument("--proto-resize", choices=("nearest", "purity"), default="nearest",
                   help="labels to the feature grid: nearest, or purity (cells one class mostly fills)")
    c.add_argument("--hybrid-ce", action="store_true",
                   help="the hybrid labels replace the teacher's where they label a pixel in the target "
                        "cross-entropy (elsewhere the teacher's arg max stays); the recipe's weight is kept")
    c.add_argument("--no-dynamic", action="store_true", help="ablation: static labels only (no dynamic/hybrid)")
    c.add_argument("--no-calibration", action="store_true", help="ablation: no domain-bias calibration")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` like :func:`uda.options.parse_args`, with this recipe's defaults and checks."""
    parser = build_parser()
    parser.set_defaults(**FIXED)
    args = parser.parse_args(argv)
    args.given = options.given_options(parser, argv)
    args.recipe = "daformer"
    demo = options.resolve_data(args)
    if args.arch is None:
        args.arch = DEMO_ARCH if demo else DEFAULT_ARCH
    defaults = DEMO if demo or args.arch == "tiny" else RECIPE
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.round_iters = args.iters
    if args.iters < 1 or not 0 <= args.warmup_iters:
        raise SystemExit(f"error: expected --iters >= 1 and --warmup-iters >= 0, got {args.iters} and "
                         f"{args.warmup_iters}")
    if args.arch in MIT_VARIANTS and args.crop % 32:
        fix = max(32, round(args.crop / 32) * 32)
        raise SystemExit(f"error: expected --crop to be a multiple of 32 for --arch {args.arch} (the MiT's output "
                         f"stride; DAFormer: 512), got {args.crop}; use --crop {fix}")
    if not (0.0 <= args.teacher_alpha <= 1.0 and 0.0 <= args.pseudo_threshold <= 1.0 and 0 <= args.jitter_p <= 1):
        raise SystemExit("error: expected --teacher-alpha, --pseudo-threshold and --jitter-p in [0, 1], got "
                         f"{args.teacher_alpha}, {args.pseudo_threshold}, {args.jitter_p}")
    if args.mic and (args.crop % args.mic_block or args.crop < MIC_MIN_GRID * args.mic_block
                     or not 0.0 <= args.mic_ratio <= 1.0):
        raise SystemExit(f"error: expected --crop a multiple of --mic-block with at least {MIC_MIN_GRID} blocks a "
                         f"side (DAFormer's scale: 512 / 32 = 16) and --mic-ratio in [0, 1], got --crop {args.crop}, "
                         f"--mic-block {args.mic_block}, --mic-ratio {args.mic_ratio}; use --mic-block "
                         f"{max(1, args.crop // MIC_MIN_GRID)}")
    if args.ignore_rows is None:
        top, bottom = CITYSCAPES_ROWS if args.target == "cityscapes" else (0, 0)
        args.ignore_rows = [round(top * args.resize / 512), round(bottom * args.resize / 512)]
    # the network's features (uda.weights.build_model): the fused map ("aspp" there) or SePiCo's projection
    args.features, args.proj_dim = (("projection", args.contrast_dim) if args.contrast_features == "projection"
                                     else ("aspp", 256))
    if args.contrast_features == "projection" and args.arch not in MIT_VARIANTS:
        raise SystemExit(f"error: --contrast-features projection needs a MiT encoder, got --arch {args.arch}")
    if not (args.contrast_start >= 0 and args.fcl_weight >= 0 and args.bcl_weight >= 0 and args.temperature > 0
            and 0 < args.proportion <= 1 and args.contrast_dim >= 1):
        raise SystemExit("error: expected --contrast-start >= 0, --fcl-weight and --bcl-weight >= 0, --temperature "
                         "> 0, --proportion in (0, 1] and --contrast-dim >= 1, got "
                         f"{args.contrast_start}, {args.fcl_weight}, {args.bcl_weight}, {args.temperature}, "
                         f"{args.proportion}, {args.contrast_dim}")
    if args.fd_lambda > 0 and args.init is None:
        args.fd_lambda = 0.0  # no ImageNet encoder to stay near (the demo: from scratch)
    if args.fd_lambda > 0 and args.arch not in MIT_VARIANTS:
        raise SystemExit(f"error: the feature distance (--fd-lambda) needs a MiT encoder, got --arch {args.arch}; "
                         "give --fd-lambda 0")
    return args
