r"""Command-line options of the reference pipeline (``examples/train_gta2cs.py``): parsing only.

:func:`parse_args` reads the options, fills the defaults of the chosen architecture (:data:`DEFAULTS`: the
paper's settings for DeepLab-V2, a small budget for the tiny demo CNN) and checks their combination. Without
dataset roots the roots point at the embedded demo dataset under ``--demo-root`` (default ``<out>/demo_data``);
the dataset itself is written by :func:`train_gta2cs.setup`, not here.
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

from .datasets import ACDC_CONDITIONS, SOURCES, TARGETS
from .mit import MIT_VARIANTS

# the option naming each dataset's root, as a source and as a target
SOURCE_ROOTS = {"gta5": "gta5_root", "synthia": "synthia_root", "cityscapes": "cityscapes_root",
                "folder": "source_root"}
TARGET_ROOTS = {"cityscapes": "cityscapes_root", "acdc": "acdc_root", "darkzurich": "darkzurich_root",
                "folder": "target_root"}
ROOT_OPTIONS = ("gta5_root", "synthia_root", "cityscapes_root", "acdc_root", "darkzurich_root", "source_root",
                "target_root")
# the embedded demos: GTA5 / SYNTHIA -> Cityscapes (demo.write_demo_dataset) and the generated pairs of
# demo.write_demo
LAYOUT_DEMOS = (("cityscapes", "acdc"), ("cityscapes", "darkzurich"), ("folder", "folder"))

# paper settings for DeepLab-V2 (spec §4); the tiny demo's own budget
SCORE_TOLERANCE = 0.003
"""The default ``--score-tolerance`` with ``--round-decisions score``: the median change of ``flip_agreement``
between models whose true mIoU moved by less than 1 point (0.0027 over the score study's seeds 0-5, rounded up). It
was chosen on the study's five shifts, seeds 0-5: in-sample (docs/examples.md, "Issue 27"; issue 35 studies a
score and a tolerance chosen where they are not tested)."""

DECISION_OPTIONS = ("round_decisions", "round_score", "score_tolerance", "score_images", "score_memory_mb",
                    "fallback")
"""The options of the decision mode: a resumed run keeps the values it was started with unless the command line
gives them (:func:`uda.state.resume`)."""

DEFAULTS = {
    "deeplabv2": {"source_iters": 20000, "rounds": 10, "round_iters": 10000, "batch_size": 2, "crop": 730,
                  "resize": 850, "eval_size": (1460, 730), "lr": 7.5e-5, "source_lr": 2.5e-4, "ema_momentum": 0.999,
                  "workers": 4, "log_every": 50, "ckpt_every": 1000, "threshold": 0.7, "threads": None},
    "tiny": {"source_iters": 500, "rounds": 3, "round_iters": 200, "batch_size": 4, "crop": 48, "resize": 64,
             "eval_size": (128, 64), "lr": 2e-3, "source_lr": 5e-3, "ema_momentum": 0.99, "workers": 0,
             "log_every": 50, "ckpt_every": 200, "threshold": 0.9, "threads": 1},
}
# SegFormer's MiT + DAFormer's decoder trained with this script's recipe: DeepLab-V2's budget, crops of 512 (a
# multiple of the encoder's stride 32, DAFormer's crop); DAFormer's own recipe is train_daformer.py
DEFAULTS.update({arch: {**DEFAULTS["deeplabv2"], "crop": 512} for arch in MIT_VARIANTS})


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (or ``"W,H"``) -> ``(W, H)``, both > 0; the type of every size option (this script's
    ``--eval-size`` and ``predict.py``'s)."""
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT with both > 0, such as 1460x730, got {text!r}")
    return int(parts[0]), int(parts[1])


def build_parser() -> argparse.ArgumentParser:
    """``train_gta2cs.py``'s options: the shared data, model and run groups (:func:`add_data_options`,
    :func:`add_model_options`, :func:`add_run_options`) and the paper's schedule and method."""
    p = argparse.ArgumentParser(description="GTA5 / SYNTHIA / Cityscapes / your data -> Cityscapes / ACDC / Dark "
                                            "Zurich / your data with bi-directional prototype contrast (protocl's "
                                            "reference pipeline).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_data_options(p, out="runs/gta2cs")
    m = add_model_options(p, "tiny for the demo, deeplabv2 otherwise. mit-b0...mit-b5: SegFormer's Mix Transformer + "
                             "DAFormer's decoder (D=256, output stride 4) trained with this script's recipe (SGD, "
                             "DeepLab-V2's budget, crop 512); DAFormer's own recipe is train_daformer.py")
    m.add_argument("--peer-classifier", choices=("all-branches", "first-two"),
                   help="load the ASPP classifier of a peer's Res_Deeplab / DeeplabMulti --source-checkpoint: "
                        "all-branches (DASS sums the four branches) or first-two (AdaptSegNet's Classifier_Module "
                        "returns inside its loop: only branches 0-1 count). Required for such a file")
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
                   help="skip stage 1: start stage 2 from the model weights of this file (a source_only.pt, any "
                        "checkpoint with a 'model' entry, or a peer's Res_Deeplab / DeeplabMulti state dict with "
                        "--peer-classifier); the network is the one the file needs; the same-budget control starts "
                        "from them too")
    t.add_argument("--round-decisions", choices=("off", "score"), default="off",
                   help="off (default): the paper's behaviour, every round kept and the last model delivered. "
                        "score: keep a stage-2 round only if the label-free --round-score of the model on the "
                        "target did not fall by more than --score-tolerance; otherwise restore the round's start "
                        "and spend its budget as --fallback says; deliver the best-scored model (the same-budget "
                        "control gets the same selection). The score does not follow mIoU on every shift "
                        "(docs/troubleshooting.md); a score chosen on some shifts did not hold on every other one (issue "
                        "35, docs/examples.md). A resumed run keeps the mode it was started with unless given")
    t.add_argument("--round-score", default="flip_agreement",
                   choices=("flip_agreement", "neg_entropy", "proto_agreement", "proto_margin", "snd"),
                   help="the label-free score of --round-decisions (uda.score; validated in docs/examples.md); a "
                        "resumed run that has scored refuses another")
    t.add_argument("--score-images", type=int, default=64,
                   help="--round-decisions: score on N target-train images, a seeded sample spread over the "
                        "target's sequences, cities and conditions (recorded in metrics.json; no label is read)")
    t.add_argument("--score-memory-mb", type=int, default=512,
                   help="--round-decisions: the scoring's batches hold at most about this much of score tensors "
                        "(probabilities at the image size), at least one image")
    t.add_argument("--score-tolerance", type=float, default=None,
                   help="--round-decisions score: undo a round only if its score fell by more than T (and deliver "
                        f"the latest model scored within T of the best); default {SCORE_TOLERANCE:g} (chosen "
                        "in-sample, docs/examples.md); 0: any fall undoes the round")
    t.add_argument("--fallback", choices=("source", "static", "drop-flagged"), default="source",
                   help="--round-decisions score: how an undone round's budget is spent from its restored start: "
                        "source-only steps (default), static (the round's static labels only: no dynamic labels, "
                        "no FCL/BCL), drop-flagged (the round's target terms without the classes its signals "
                        "flagged: dynamic/static agreement < 50%%). An undone round costs its budget twice")
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
    c.add_argument("--target-ce", choices=("hybrid", "margin", "hires", "hires_margin"), default="hybrid",
                   help="labels of the target cross-entropy (FCL/BCL always use the hybrid labels): hybrid (the "
                        "paper's), margin (dynamic fill-ins only where the best prototype beats the second by "
                        "--target-ce-margin), hires (dynamic labels decided at label resolution), hires_margin "
                        "(both); uda.target_ce, study in docs/examples.md")
    c.add_argument("--target-ce-margin", type=float, default=0.05,
                   help="cosine margin of --target-ce margin / hires_margin, in [0, 2]")
    c.add_argument("--reliability-weight", action="store_true",
                   help="weight FCL/BCL (the orchestrator's class_weight) and the target CE by each class's "
                        "label-free reliability (dynamic/static agreement so far in the round; uda.reliability)")
    c.add_argument("--proto-resize", choices=("nearest", "purity"), default="nearest",
                   help="labels to the feature grid for the prototypes and FCL/BCL: nearest (the paper's) or purity "
                        "(only cells that one class mostly fills; protocl's resize='purity')")
    c.add_argument("--rectify", action="store_true",
                   help="ProDA-style soft rectification in place of the hard dynamic labels: the round's static "
                        "model's probabilities weighted by a softmax of the cosines to the target EMA prototypes "
                        "(uda.reliability)")
    c.add_argument("--no-contrastive", action="store_true", help="ablation: no FCL/BCL")
    c.add_argument("--no-dynamic", action="store_true", help="ablation: static labels only (no dynamic/hybrid)")
    c.add_argument("--no-calibration", action="store_true", help="ablation: no domain-bias calibration")
    r = add_run_options(p)
    r.add_argument("--value-checks", choices=("first", "always"), default="first",
                   help="protocl's label-value checks (a pass over each label map; on CUDA device-side, no host sync): "
                        "on the first step of each stage and round only, or on every step")
    r.add_argument("--diagnostics", action=argparse.BooleanOptionalAction,
                   help="per-class coverage and precision of static/dynamic/hybrid labels against target train "
                        "ground truth, logged and in metrics.json (reads target labels; never trained on; "
                        "default: on for the demo except Dark Zurich's, which has no train labels; off otherwise)")
    r.add_argument("--signals", action=argparse.BooleanOptionalAction, default=True,
                   help="label-free reliability signals of the dynamic labels per class and round (agreement with "
                        "the static labels and the prediction, prototype margin and separation; uda.signals), "
                        "logged and in metrics.json; they read no target label")
    r.add_argument("--pseudo-cache-mb", type=int, default=512, help="RAM for caching logits between threshold passes")
    return p


def add_data_options(p: argparse.ArgumentParser, *, out: str) -> argparse._ArgumentGroup:
    """The data group both scripts share (datasets, class tables, crops, loading); ``out``: ``--out``'s default."""
    d = p.add_argument_group("data (layouts and class tables: docs/datasets.md)")
    d.add_argument("--source", choices=SOURCES,
                   help="source dataset (default: synthia when --synthia-root is given, folder when --source-root "
                        "is, else gta5)")
    d.add_argument("--target", choices=TARGETS, default="cityscapes", help="target dataset")
    d.add_argument("--gta5-root", help="GTA5 root (images/, labels/); omit the roots for the embedded demo")
    d.add_argument("--synthia-root", help="SYNTHIA-RAND-CITYSCAPES root (RGB/, GT/LABELS/ 16-bit PNGs); evaluated "
                                          "over the 16 shared classes (miou16) and 13 (miou13)")
    d.add_argument("--cityscapes-root", help="Cityscapes root (leftImg8bit/, gtFine/): the target, or the source "
                                             "with --source cityscapes")
    d.add_argument("--acdc-root", help="ACDC root (rgb_anon/, gt/) for --target acdc")
    d.add_argument("--acdc-conditions", nargs="+", choices=ACDC_CONDITIONS + ("all",), default=["all"],
                   help="ACDC conditions trained on and evaluated")
    d.add_argument("--darkzurich-root", help="Dark Zurich root (rgb_anon/, gt/) for --target darkzurich")
    d.add_argument("--source-root", help="--source folder: images/ and labels/ (raw ids of the class table)")
    d.add_argument("--target-root", help="--target folder: train/images/ (labels optional) and val/{images,labels}/")
    d.add_argument("--class-table", help="class table (JSON: names, raw ids, ignore ids, colours) of --target "
                                         "folder, and of --source folder unless --source-class-table is given")
    d.add_argument("--source-class-table", help="class table of --source folder when its raw ids differ")
    d.add_argument("--demo-root", help="where the demo dataset is written (default: <out>/demo_data)")
    d.add_argument("--out", default=out, help="output directory (checkpoints, figures, log, metrics.json)")
    d.add_argument("--batch-size", type=int, help="source and target images per step and rank (2 + 2 in the paper)")
    d.add_argument("--crop", type=int, help="random square crop (730)")
    d.add_argument("--resize", type=int, help="short side before random scaling (850)")
    d.add_argument("--scales", type=float, nargs="+", default=[0.8, 1.0, 1.2], help="random scale choices")
    d.add_argument("--eval-size", type=parse_size, help="evaluation input WIDTHxHEIGHT (1460x730)")
    d.add_argument("--workers", type=int, help="DataLoader worker processes")
    d.add_argument("--check-data", action=argparse.BooleanOptionalAction,
                   help="pre-flight check of every image and label of the chosen splits before training (decodes "
                        "each file, checks label mode, ids and size; reports all bad files at once). Default: on "
                        "for the real datasets, off for the generated demo; never repeated on --resume")
    d.add_argument("--on-bad-sample", choices=("error", "skip"), default="error",
                   help="a file that fails to read during training: 'error' stops with its path; 'skip' uses the "
                        "next sample instead, logs a warning and counts it in metrics.json ('bad_samples')")
    return d


def add_model_options(p: argparse.ArgumentParser, arch_help: str) -> argparse._ArgumentGroup:
    """The model group both scripts share: ``--arch``, ``--init``, ``--init-layout``."""
    m = p.add_argument_group("model")
    m.add_argument("--arch", choices=("deeplabv2", "tiny", *MIT_VARIANTS), help="default: " + arch_help)
    m.add_argument("--init", help="ResNet-101 weights for the backbone, layout detected from the file's structure: "
                                  "torchvision (fc), DeepLab init (Scale.), AdaptSegNet/DASS Res_Deeplab or "
                                  "DeeplabMulti (their classifier is skipped), a run's checkpoint; for --arch "
                                  "mit-b*: SegFormer's mit_b*.pth or Hugging Face's nvidia/mit-b* of that size "
                                  "(ImageNet head dropped); never downloaded (docs/reproduce.md, initial weights)")
    m.add_argument("--init-layout", choices=("torchvision", "deeplab"),
                   help="the --init file's layout where its structure cannot tell (a bare backbone: torchvision = "
                        "stride on the 3x3 conv, RGB ImageNet mean/std; deeplab = stride on the 1x1 conv, BGR caffe "
                        "mean), or deeplab for a caffe-converted ImageNet ResNet with an fc")
    return m


def add_run_options(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The run group both scripts share (device, precision, seed, resume, logging, checkpoints)."""
    r = p.add_argument_group("run")
    r.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (torchrun picks LOCAL_RANK)")
    r.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast the network forward (losses stay fp32); fp16 adds a GradScaler, checkpointed")
    r.add_argument("--sync-debug", action="store_true",
                   help="run the training steps (not the first of a stage/round, not logging) under "
                        "torch.cuda.set_sync_debug_mode('error'): any host sync raises (CUDA only)")
    r.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars to <out>/tensorboard")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resume", help="checkpoint to continue from, or 'auto': <out>/checkpoint.pt when it exists, else "
                                    "a fresh start (the same command for the first submission and every requeue)")
    r.add_argument("--log-every", type=int)
    r.add_argument("--ckpt-every", type=int, help="checkpoint every N iterations (and at each stage/round end)")
    r.add_argument("--threads", type=int,
                   help="torch CPU threads (tiny: 1, its tensors are too small to gain from more and one thread "
                        "stays fast on a busy machine; deeplabv2: torch's choice)")
    return r


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``; fill the architecture's defaults and the demo's dataset roots; validate the combination.

    ``args.demo`` is True for the embedded demo (no dataset root given); then the source's and the target's root
    options (and ``--class-table`` for folder -> folder) name what :func:`uda.run.setup` writes.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_options(parser, argv)
    args.recipe = "gta2cs"
    demo = resolve_data(args)
    if args.peer_classifier is not None and args.source_checkpoint is None:
        raise SystemExit("error: --peer-classifier given without --source-checkpoint")
    if not 0.0 <= args.target_ce_margin <= 2.0:
        raise SystemExit(f"error: expected --target-ce-margin in [0, 2] (a cosine difference), got "
                         f"{args.target_ce_margin}")
    if args.no_dynamic and args.target_ce in ("hires", "hires_margin"):
        raise SystemExit(f"error: --target-ce {args.target_ce} decides dynamic labels, but --no-dynamic is given")
    check_round_options(args)
    fill_defaults(args, DEFAULTS, "tiny" if demo else "deeplabv2")
    if args.rounds < 1 or args.round_iters < 1 or args.source_iters < 1:
        raise SystemExit("error: --source-iters, --rounds and --round-iters must be >= 1")
    if args.score_images < 1 or args.score_memory_mb < 1:
        raise SystemExit(f"error: expected --score-images >= 1 and --score-memory-mb >= 1, got {args.score_images} "
                         f"and {args.score_memory_mb}")
    if args.control is None:
        args.control = demo
    if args.diagnostics is None:
        args.diagnostics = demo and args.target != "darkzurich"  # Dark Zurich has no train labels
    return args


def resolve_data(args: argparse.Namespace) -> bool:
    """The data options both scripts share, in place: the default ``--source``, the roots' combination, the
    demo's roots (under ``--demo-root``, default ``<out>/demo_data``), ACDC's conditions, ``--check-data``'s
    default; sets and returns ``args.demo``. ``SystemExit`` naming the options that do not go together."""
    if args.source is None:
        args.source = "synthia" if args.synthia_root else "folder" if args.source_root else "gta5"
    source_root, target_root = SOURCE_ROOTS[args.source], TARGET_ROOTS[args.target]
    flag = {key: "--" + key.replace("_", "-") for key in ROOT_OPTIONS}
    if args.source == args.target and args.source != "folder":
        raise SystemExit(f"error: --source and --target are both {args.source}")
    for key in ROOT_OPTIONS:
        if getattr(args, key) is not None and key not in (source_root, target_root):
            raise SystemExit(f"error: {flag[key]} given with --source {args.source} --target {args.target}")
    demo = getattr(args, source_root) is None and getattr(args, target_root) is None
    if (getattr(args, source_root) is None) != (getattr(args, target_root) is None):
        raise SystemExit(f"error: give both {flag[source_root]} and {flag[target_root]} (or neither for the "
                         "embedded demo)")
    layout_demo = demo and args.target != "cityscapes"
    if layout_demo and (args.source, args.target) not in LAYOUT_DEMOS:
        raise SystemExit(f"error: the embedded demo exists for gta5/synthia -> cityscapes and "
                         f"{', '.join(f'{s} -> {t}' for s, t in LAYOUT_DEMOS)}; give {flag[source_root]} and "
                         f"{flag[target_root]} for --source {args.source} --target {args.target}")
    if not demo and "folder" in (args.source, args.target) and args.class_table is None:
        raise SystemExit("error: --source folder / --target folder need --class-table (the labels' classes)")
    if args.init_layout is not None and args.init is None:
        raise SystemExit("error: --init-layout given without --init")
    if args.source_class_table is not None and args.source != "folder":
        raise SystemExit(f"error: --source-class-table given with --source {args.source} (built-in classes)")
    if demo:
        args.demo_root = str(args.demo_root or Path(args.out) / "demo_data")
        if layout_demo:  # the roots that demo.write_demo writes
            from .demo import demo_roots

            for key, value in demo_roots(args.demo_root, args.source, args.target).items():
                setattr(args, key, value)
        else:
            setattr(args, source_root, str(Path(args.demo_root) / args.source))
            args.cityscapes_root = str(Path(args.demo_root) / "cityscapes")
    args.acdc_conditions = list(ACDC_CONDITIONS) if "all" in args.acdc_conditions else args.acdc_conditions
    if args.check_data is None:
        args.check_data = not demo  # the demo is generated, hence well formed
    args.demo = demo
    return demo


def fill_defaults(args: argparse.Namespace, defaults: dict[str, dict], default_arch: str) -> None:
    """``--arch`` (``default_arch`` when not given) and every option left unset from ``defaults[arch]``."""
    if args.arch is None:
        args.arch = default_arch
    for key, value in defaults[args.arch].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[str]:
    """The options the command line gives (their ``dest`` names, sorted): a second parse in which no option has a
    default. A resumed run takes the others of :data:`DECISION_OPTIONS` from its checkpoint."""
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:
        action.default = argparse.SUPPRESS
    return sorted(vars(quiet.parse_known_args(argv)[0]))


def check_round_options(args: argparse.Namespace) -> None:
    """The combinations of issue 27's round options that cannot work (a ``SystemExit`` naming both)."""
    if args.score_tolerance is None:  # the default: only with decisions on
        args.score_tolerance = SCORE_TOLERANCE if args.round_decisions == "score" else 0.0
    if not (math.isfinite(args.score_tolerance) and args.score_tolerance >= 0):
        raise SystemExit(f"error: expected --score-tolerance >= 0 (a score difference), got {args.score_tolerance}")
    if args.round_decisions == "off" and (args.score_tolerance > 0 or args.fallback != "source"):
        raise SystemExit("error: --score-tolerance and --fallback act on round decisions, but --round-decisions "
                         "off is in force (the default since issue 34: give --round-decisions score)")
    if not args.signals and (args.reliability_weight or args.fallback == "drop-flagged"):
        what = "--reliability-weight" if args.reliability_weight else "--fallback drop-flagged"
        raise SystemExit(f"error: {what} reads the label-free signals, but --no-signals is given")
    if args.rectify and (args.no_dynamic or args.target_ce != "hybrid"):
        what = "--no-dynamic" if args.no_dynamic else f"--target-ce {args.target_ce}"
        raise SystemExit(f"error: --rectify replaces the dynamic labels, but {what} is given")


def config_dict(args: argparse.Namespace) -> dict:
    """``vars(args)`` as plain values (tuples -> lists, paths -> strings): what checkpoints and metrics.json store."""

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {key: plain(value) for key, value in vars(args).items() if key != "given"}
