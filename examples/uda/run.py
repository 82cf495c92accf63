r"""Building a run of the reference pipeline: :func:`setup` is the one way to build a :class:`Run` (used by
``train_gta2cs.main``, the tests, ``benchmarks/gpu_check.py`` and the adaptation study): process group, demo
data, data streams, model, orchestrator, optimizer, log, the output folder's checks.

The training loop itself is ``examples/train_gta2cs.py``; its state and checkpoints are :mod:`uda.state`, what it
reports :mod:`uda.report`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import protocl

from . import checkpoint, datasets, dist, options, preflight, reliability, runtime, target_ce
from .classes import ClassTable, load_table
from .daformer_net import DAFormerNet
from .loading import EvalSet, SkipCounter, TrainSet, pseudo_label_size
from .schedule import BETAS, WEIGHT_DECAY
from .stream import BatchStream, ignore_stop_signals
from .weights import build_model, resume_network

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Run:
    """What :func:`setup` builds (no state that a restart needs: that is the checkpoint dict of :func:`start`)."""

    args: object
    config: dict
    rank: int
    world: int
    device: torch.device
    out: Path
    log: Callable[[str], None]
    table: ClassTable  # the run's K classes: names, colours (the target's class table)
    subsets: dict | None
    target_train: list
    target_val: list
    source_set: TrainSet
    target_set: TrainSet
    source_stream: BatchStream
    target_stream: BatchStream
    val_loader: DataLoader
    model: nn.Module
    net: nn.Module  # the model, wrapped in DistributedDataParallel on several ranks
    contrast: protocl.BidirectionalContrast | None  # None: train_daformer.py without --contrast
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tb: object = None
    started: tuple = (0.0, 0)  # (time, step) when training (re)started: the it/s of the log
    guard: runtime.NonFiniteGuard | None = None  # non-finite losses/gradients, read at the log point
    stop: runtime.StopRequest | None = None  # SIGTERM/SIGUSR1, polled once per step (set by main)
    target_ce: Callable | None = None  # --target-ce: the target CE's labels (uda.target_ce; None: hybrid y_T)
    teacher: nn.Module | None = None  # --rectify: the round's static-label model, frozen (uda.reliability);
    # train_daformer.py: the EMA teacher (uda.teacher)
    imnet: nn.Module | None = None  # train_daformer.py: the frozen initial encoder of the feature distance
    things: tuple[int, ...] = ()  # train_daformer.py: the feature distance's classes
    thresholds: protocl.ClassBalancedThresholds | None = None  # train_daformer.py --contrast-labels class-balanced
    resumed: dict | None = None  # the --resume checkpoint, read and checked by setup (uda.state.start takes it)

    @property
    def num_classes(self) -> int:
        """K, from the class table: the network's head, the prototypes, thresholds, metrics and figures."""
        return self.table.num_classes


def setup(args) -> Run:
    """Build a run from parsed options (:func:`uda.options.parse_args`): process group, demo dataset (written
    by rank 0, the others wait at a barrier), data streams, model, orchestrator, optimizer, log."""
    rank, world, device = dist.setup(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = runtime.check_output_dir(args.out)  # before anything is written: exists, takes a file
    if args.demo:
        if rank == 0:
            if args.target == "cityscapes":
                from .demo import write_demo_dataset

                write_demo_dataset(args.demo_root, seed=args.seed, source=args.source)
            else:
                from .demo import write_demo

                write_demo(args.demo_root, args.source, args.target, seed=args.seed)
        dist.barrier()
    log = make_log(out, rank)
    checkpoint.seed_everything(args.seed)
    domains = read_domains(args)
    source, target_train, target_val, table = domains.source, domains.target_train, domains.target_val, domains.table
    if args.diagnostics and any(s.label is None for s in target_train):
        missing = [s.image for s in target_train if s.label is None]
        raise ValueError(f"expected target train labels for --diagnostics (they are read for the logged "
                         f"pseudo-label diagnostics only), got {len(missing)} images without, e.g. {str(missing[0])!r}")
    # the network, its --init file and the --resume checkpoint first: refused before anything is written
    model = build_model(args.arch, table.num_classes, features=args.features, proj_dim=args.proj_dim,
                        init=args.init, init_layout=args.init_layout, class_names=table.names).to(device)
    resumed = read_resume(args, out, model)
    daformer = args.recipe == "daformer"  # train_daformer.py: its own crops, no contrast, an EMA teacher
    if daformer:
        from . import mean_teacher

        things = mean_teacher.thing_classes(args.thing_classes, table)  # --thing-classes: refused here too
    log(model.init_message)  # the initial weights' layout as detected, and what was loaded or skipped
    if args.check_data and resumed is None:  # not repeated on a resume
        check_splits(args, rank, world, log, out, source, target_train, target_val)
    pin, scales, bad = device.type == "cuda", tuple(args.scales), args.on_bad_sample
    if daformer:
        source_set, target_set = mean_teacher.train_sets(args, source, target_train, table, out, rank, log)
    else:
        source_set = TrainSet(source, resize=args.resize, crop=args.crop, scales=scales, on_bad_sample=bad)
        target_set = TrainSet(target_train, resize=args.resize, crop=args.crop, scales=scales, on_bad_sample=bad,
                              labels=args.diagnostics)  # target ground truth: read only when asked for
    stream = {"seed": args.seed, "rank": rank, "world": world, "workers": args.workers, "pin_memory": pin}
    val_loader = SkipCounter(DataLoader(  # SkipCounter: the evaluation's skipped files (--on-bad-sample skip)
        EvalSet(target_val[rank::world], size=tuple(args.eval_size), on_bad_sample=bad), batch_size=1,
        num_workers=min(args.workers, 2), pin_memory=pin, worker_init_fn=ignore_stop_signals,
        generator=torch.Generator().manual_seed(args.seed)))  # not the global RNG (uda.stream.BatchStream)
    if args.arch != "tiny" and args.init is None and not (args.source_checkpoint or args.resume or args.demo):
        name = "DeepLab-V2" if args.arch == "deeplabv2" else f"{args.arch} (DAFormer)"
        log(f"warning: --init not given, {name} starts from random weights (expect poor results)")
    unused = args.features in ("layer4", "projection")  # projections idle in source-only or pre-contrast steps
    net = (DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device],
                                   find_unused_parameters=unused) if world > 1 else model)
    # train_daformer.py: only with --contrast (an add-on to its recipe, issue 33)
    contrast = None if daformer and not args.contrast else protocl.BidirectionalContrast(
        table.num_classes, model.feature_dim, fcl_weight=0.0 if args.no_contrastive else args.fcl_weight,
        bcl_weight=0.0 if args.no_contrastive else args.bcl_weight, temperature=args.temperature,
        momentum=args.ema_momentum, threshold=args.threshold, fuse=args.fuse, calibrate=not args.no_calibration,
        dynamic=not (args.no_dynamic or args.rectify), resize=args.proto_resize).to(device)  # --rectify: its own
    config = {**options.config_dict(args), "classes": table.to_dict()}  # in every checkpoint: predict.py reads it
    # room for every file the run writes (runtime.output_files), checked before training
    model_bytes = runtime.tensor_bytes(model.state_dict())
    if daformer:  # model, teacher, AdamW's two moments; initial.pt (the control's start), no pseudo-label files
        state_bytes, w, h = 4 * model_bytes, 0, 0
        if contrast is not None:
            state_bytes += runtime.tensor_bytes(contrast.state_dict())  # the prototype EMAs
    else:
        state_bytes = 2 * model_bytes + runtime.tensor_bytes(contrast.state_dict())  # + SGD momentum, the EMAs
        try:
            w, h = pseudo_label_size(target_train[0], args.resize)
        except ValueError:  # an unreadable first image (--no-check-data): assume Cityscapes' 2:1
            w, h = 2 * args.resize, args.resize
    files = runtime.output_files(model_bytes, state_bytes + (model_bytes if args.rectify else 0),
                                 rounds=args.rounds, decisions=args.round_decisions == "score", control=args.control,
                                 stage1_best=args.stage1_best_on_target_val, initial=daformer,
                                 pseudo_labels=0 if daformer else len(target_train), pseudo_label_pixels=w * h)
    runtime.check_output_dir(out, sum(files.values()))
    optimizer, scaler = make_optimizer(model, args.lr if daformer else args.source_lr, device, args.amp,
                                       args.recipe)
    run = Run(args=args, config=config, rank=rank, world=world, device=device, out=out, log=log, table=table,
              subsets=domains.subsets,
              target_train=target_train, target_val=target_val, source_set=source_set, target_set=target_set,
              source_stream=BatchStream(source_set, args.batch_size, stream=0, **stream),
              target_stream=BatchStream(target_set, args.batch_size, stream=1, **stream), val_loader=val_loader,
              model=model, net=net, contrast=contrast, optimizer=optimizer, scaler=scaler,
              tb=tensorboard(args, out, rank),
              guard=runtime.NonFiniteGuard(device, grads=args.amp != "fp16"),  # fp16: the scaler skips inf steps
              target_ce=None if daformer else target_ce.hook(args.target_ce, threshold=args.threshold,
                                                             margin=args.target_ce_margin, fuse=args.fuse),
              teacher=reliability.new_teacher(model) if args.rectify or daformer else None, resumed=resumed)
    if daformer:
        run.things = things
        run.imnet = mean_teacher.frozen_encoder(model) if args.fd_lambda > 0 else None
        if args.contrast and args.contrast_labels == "class-balanced":  # the batch's histogram (reset each step)
            run.thresholds = protocl.ClassBalancedThresholds(table.num_classes, args.proportion).to(device)
    log(f"{world} process(es) on {device}; source ({args.source}) {len(source_set)} images, target ({args.target}) "
        f"train {len(target_train)}, val {len(target_val)}; K={table.num_classes} classes ({table.name}); arch "
        f"{args.arch}, D={model.feature_dim}, amp {args.amp}")
    if args.sync_debug and device.type != "cuda":
        log("note: --sync-debug has an effect on CUDA only")
    return run


def read_resume(args, out: Path, model: nn.Module) -> dict | None:
    """The ``--resume`` checkpoint (``auto``: ``<out>/checkpoint.pt`` when it exists; None: a new run), read and
    checked before anything is written: made by this script (``ValueError`` naming the other) for the network
    this command builds (:func:`uda.weights.resume_network`: ``ValueError`` naming both, e.g. another K)."""
    path = runtime.resolve_resume(args.resume, out)
    if path is None:
        return None
    ckpt = checkpoint.load(path, "--resume")
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    recipe = config.get("recipe", "gta2cs")  # runs made before train_daformer.py: gta2cs
    if recipe != args.recipe:
        script = {"gta2cs": "train_gta2cs.py", "daformer": "train_daformer.py"}
        raise ValueError(f"expected --resume {str(path)!r} to be a checkpoint of {script[args.recipe]}, got one of "
                         f"{script.get(recipe, recipe)}: resume it with that script")
    if "contrast" in ckpt and not getattr(args, "contrast", True):  # train_daformer.py: its prototypes would be lost
        raise ValueError(f"expected --contrast to resume {str(path)!r} (its run trained with protocl's contrast and "
                         "the checkpoint holds its prototypes), got no --contrast: give the options it ran with")
    ckpt["network_check"] = resume_network(model, ckpt, source_checkpoint=getattr(args, "source_checkpoint", None))
    return ckpt


def read_domains(args) -> datasets.Domains:
    """The source and target samples of the options and the run's class table (:func:`datasets.resolve_domains`:
    same K and class names in both domains, or a ``ValueError``)."""
    table = load_table(args.class_table) if args.class_table else None
    source_table = load_table(args.source_class_table) if args.source_class_table else None
    return datasets.resolve_domains(
        args.source, getattr(args, options.SOURCE_ROOTS[args.source]), args.target,
        getattr(args, options.TARGET_ROOTS[args.target]), conditions=args.acdc_conditions, class_table=table,
        source_class_table=source_table)


def check_splits(args, rank: int, world: int, log: Callable[[str], None], out: Path, source: list,
                 target_train: list, target_val: list) -> None:
    """The pre-flight check (:func:`uda.preflight.check_data`) of the run's splits: the source, the target train
    images (their labels only with ``--diagnostics``, the only case they are read) and the target val split,
    sharded over ranks; every rank raises on the bad files of all. Statistics in ``<out>/data_check.json``."""
    if not args.diagnostics:
        target_train = [replace(s, label=None) for s in target_train]
    splits = {args.source: source, f"{args.target} train": target_train, f"{args.target} val": target_val}

    def gather(mine: tuple) -> list:
        every: list = [None] * world
        torch.distributed.all_gather_object(every, mine)
        return every

    workers = max(1, preflight.default_workers() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    preflight.check_data(splits, workers=workers, progress=rank == 0, log=log, rank=rank, world=world, gather=gather if world > 1 else None,
                         report_path=out / "data_check.json" if rank == 0 else None)


def forward(run: Run, net: nn.Module, images: Tensor, **kwargs) -> tuple[Tensor, ...]:
    """The network under autocast (``--amp``); logits back in fp32 for the losses (protocl's losses upcast the
    features themselves, so those stay in the autocast dtype). ``kwargs`` go to the network (through DDP's
    forward): ``encoder=True`` adds a MiT's last stage map (:class:`uda.daformer_net.DAFormerNet`)."""
    with autocast(run):
        logits, *rest = net(images.to(run.device, non_blocking=True), **kwargs)
    return (logits.float(), *rest)


def autocast(run: Run) -> contextlib.AbstractContextManager:
    """``torch.autocast`` at ``--amp``'s dtype on the run's device (a null context with ``--amp none``)."""
    dtype = AMP_DTYPES[run.args.amp]
    return torch.autocast(run.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def tensorboard(args, out: Path, rank: int):
    """``--tensorboard``: a ``SummaryWriter`` on rank 0 (None otherwise)."""
    if not (args.tensorboard and rank == 0):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ValueError(f"expected the tensorboard package for --tensorboard (pip install tensorboard, "
                         f"or pip install -e '.[examples]'), got ImportError: {error}") from None
    return SummaryWriter(str(out / "tensorboard"))


def make_log(out: Path, rank: int) -> Callable[[str], None]:
    """Print on rank 0 and append to ``<out>/log.txt``."""

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)
            with open(out / "log.txt", "a") as f:
                f.write(message + "\n")

    return log


def make_optimizer(model: nn.Module, lr: float, device: torch.device, amp: str, recipe: str = "gta2cs"
                   ) -> tuple[torch.optim.Optimizer, torch.amp.GradScaler]:
    """The recipe's optimizer and a fresh GradScaler (enabled with ``--amp fp16``). ``gta2cs``: SGD, momentum
    0.9, weight decay 5e-4, the classifier at 10x ``lr``; ``daformer``: AdamW, betas (0.9, 0.999), weight decay
    0.01, the decoder at 10x ``lr``, no decay on a MiT's norms (:func:`uda.schedule.adamw_param_groups`; other
    networks: their classifier groups). Fused on CUDA (with a GradScaler it skips inf steps without a host read)."""
    fused = {"fused": True} if device.type == "cuda" else {}
    if recipe == "daformer":
        groups = (model.param_groups(lr, weight_decay=WEIGHT_DECAY) if isinstance(model, DAFormerNet)
                  else model.param_groups(lr))
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=BETAS, weight_decay=WEIGHT_DECAY, **fused)
    else:
        optimizer = torch.optim.SGD(model.param_groups(lr), lr=lr, momentum=0.9, weight_decay=5e-4, **fused)
    return optimizer, torch.amp.GradScaler(device.type, enabled=amp == "fp16")


def new_optimizer(run: Run, lr: float) -> None:
    """A fresh optimizer and scaler at ``lr`` (a new phase: stage 2, the control)."""
    run.optimizer, run.scaler = make_optimizer(run.model, lr, run.device, run.args.amp, run.args.recipe)
