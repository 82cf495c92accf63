r"""Building a run of the reference pipeline and reporting it: :func:`setup` (the one way to build a run, used
by ``train_gta2cs.main``, the tests, ``benchmarks/gpu_check.py`` and the adaptation study), the round's
diagnostics and figure, and :func:`finish` (metrics.json, curves, the per-class table, the last line).

The training loop itself is ``examples/train_gta2cs.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import protocl
from protocl.distributed import all_reduce_sum_

from . import checkpoint, diagnostics, dist, figures, layouts, options, preflight, runtime, target_ce
from .classes import ClassTable, load_table
from .data import BatchStream, EvalSet, SkipCounter, TrainSet, ignore_stop_signals, pseudo_label_size
from .evaluate import iou_table
from .model import build_model

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
    contrast: protocl.BidirectionalContrast
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    tb: object = None
    started: tuple = (0.0, 0)  # (time, step) when training (re)started: the it/s of the log
    guard: runtime.NonFiniteGuard | None = None  # non-finite losses/gradients, read at the log point
    stop: runtime.StopRequest | None = None  # SIGTERM/SIGUSR1, polled once per step (set by main)
    target_ce: Callable | None = None  # --target-ce: the target CE's labels (uda.target_ce; None: hybrid y_T)

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
                from .synthetic import write_demo_dataset

                write_demo_dataset(args.demo_root, seed=args.seed, source=args.source)
            else:
                from .layout_demo import write_demo

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
    if args.check_data and runtime.resolve_resume(args.resume, out) is None:  # not repeated on a resume
        check_data(args, rank, world, log, out, source, target_train, target_val)
    pin, scales, bad = device.type == "cuda", tuple(args.scales), args.on_bad_sample
    source_set = TrainSet(source, resize=args.resize, crop=args.crop, scales=scales, on_bad_sample=bad)
    target_set = TrainSet(target_train, resize=args.resize, crop=args.crop, scales=scales, on_bad_sample=bad,
                          labels=args.diagnostics)  # target ground truth: read only when asked for
    stream = {"seed": args.seed, "rank": rank, "world": world, "workers": args.workers, "pin_memory": pin}
    val_loader = SkipCounter(DataLoader(  # SkipCounter: the evaluation's skipped files (--on-bad-sample skip)
        EvalSet(target_val[rank::world], size=tuple(args.eval_size), on_bad_sample=bad), batch_size=1,
        num_workers=min(args.workers, 2), pin_memory=pin, worker_init_fn=ignore_stop_signals))
    model = build_model(args.arch, table.num_classes, features=args.features, proj_dim=args.proj_dim,
                        init=args.init).to(device)
    if args.arch == "deeplabv2" and args.init is None:
        log("warning: --init not given, DeepLab-V2 starts from random weights (expect poor results)")
    net = (DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device],
                                   find_unused_parameters=args.features == "layer4") if world > 1 else model)
    contrast = protocl.BidirectionalContrast(
        table.num_classes, model.feature_dim, fcl_weight=0.0 if args.no_contrastive else args.fcl_weight,
        bcl_weight=0.0 if args.no_contrastive else args.bcl_weight, temperature=args.temperature,
        momentum=args.ema_momentum, threshold=args.threshold, fuse=args.fuse, calibrate=not args.no_calibration,
        dynamic=not args.no_dynamic).to(device)
    config = {**options.config_dict(args), "classes": table.to_dict()}  # in every checkpoint: predict.py reads it
    run = Run(args=args, config=config, rank=rank, world=world, device=device, out=out, log=log, table=table,
              subsets=domains.subsets,
              target_train=target_train, target_val=target_val, source_set=source_set, target_set=target_set,
              source_stream=BatchStream(source_set, args.batch_size, stream=0, **stream),
              target_stream=BatchStream(target_set, args.batch_size, stream=1, **stream), val_loader=val_loader,
              model=model, net=net, contrast=contrast, optimizer=None, scaler=None)
    run.target_ce = target_ce.hook(args.target_ce, threshold=args.threshold, margin=args.target_ce_margin,
                                   fuse=args.fuse)
    new_optimizer(run, args.source_lr)
    # room for what the run writes (checkpoints ~ weights + SGD momentum, pseudo labels), checked before training
    state_bytes = 2 * runtime.tensor_bytes(model.state_dict()) + runtime.tensor_bytes(contrast.state_dict())
    try:
        w, h = pseudo_label_size(target_train[0], args.resize)
    except ValueError:  # an unreadable first image (--no-check-data): assume Cityscapes' 2:1
        w, h = 2 * args.resize, args.resize
    runtime.check_output_dir(out, runtime.estimate_output_bytes(state_bytes, pseudo_labels=len(target_train),
                                                                pseudo_label_pixels=w * h // 4))
    run.guard = runtime.NonFiniteGuard(device, grads=args.amp != "fp16")  # fp16: the GradScaler skips inf steps
    if args.tensorboard and rank == 0:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise ValueError(f"expected the tensorboard package for --tensorboard (pip install tensorboard, "
                             f"or pip install -e '.[examples]'), got ImportError: {error}") from None
        run.tb = SummaryWriter(str(out / "tensorboard"))
    log(f"{world} process(es) on {device}; source ({args.source}) {len(source_set)} images, target ({args.target}) "
        f"train {len(target_train)}, val {len(target_val)}; K={table.num_classes} classes ({table.name}); arch "
        f"{args.arch}, D={model.feature_dim}, amp {args.amp}")
    if args.sync_debug and device.type != "cuda":
        log("note: --sync-debug has an effect on CUDA only")
    return run


def read_domains(args) -> layouts.Domains:
    """The source and target samples of the options and the run's class table (:func:`layouts.resolve_domains`:
    same K and class names in both domains, or a ``ValueError``)."""
    table = load_table(args.class_table) if args.class_table else None
    source_table = load_table(args.source_class_table) if args.source_class_table else None
    return layouts.resolve_domains(
        args.source, getattr(args, options.SOURCE_ROOTS[args.source]), args.target,
        getattr(args, options.TARGET_ROOTS[args.target]), conditions=args.acdc_conditions, class_table=table,
        source_class_table=source_table)


def check_data(args, rank: int, world: int, log: Callable[[str], None], out: Path, source: list,
               target_train: list, target_val: list) -> None:
    """The pre-flight check (:mod:`uda.preflight`) of the source split, the target train images (and their
    labels with ``--diagnostics``, the only case they are read) and the target val split; sharded over ranks,
    the bad files of all ranks reported by every rank (one ``ValueError``). Statistics in
    ``<out>/data_check.json``."""
    if not args.diagnostics:
        target_train = [replace(s, label=None) for s in target_train]
    splits = {args.source: source, f"{args.target} train": target_train, f"{args.target} val": target_val}
    shard = {name: split[rank::world] for name, split in splits.items()}
    workers = max(1, preflight.default_workers() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    stats, bad = preflight.scan(shard, workers=workers, progress=rank == 0)
    if world > 1:  # every rank learns every rank's bad files, and all stop together
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (stats, bad))
        bad = [b for _, rank_bad in gathered for b in rank_bad]
        stats = {**stats, **{k: sum(s[k] for s, _ in gathered) for k in ("files", "samples", "bytes")},
                 "seconds": max(s["seconds"] for s, _ in gathered)}
        stats["files_per_s"] = round(stats["files"] / max(stats["seconds"], 1e-9), 1)
        stats["mb_per_s"] = round(stats["bytes"] / 2**20 / max(stats["seconds"], 1e-9), 1)
    if bad:
        raise ValueError(preflight.report(bad, splits, stats["files"]))
    log(preflight.summary(stats, splits))
    if rank == 0:
        preflight.write_report(stats, out / "data_check.json")


def bad_samples(run: Run, state: dict) -> dict:
    """``{"skipped", "files"}`` of the bad files skipped so far (``--on-bad-sample skip``), over all ranks (a
    collective under torch.distributed: every rank calls it). Each rank counts its own; on a resume rank 0
    holds the total written in the checkpoint, the others start from zero."""
    own = state["bad_samples"]
    if run.world == 1:
        return {"skipped": own["skipped"], "files": sorted(own["files"])}
    gathered = [None] * run.world
    torch.distributed.all_gather_object(gathered, own)
    return {"skipped": sum(g["skipped"] for g in gathered), "files": sorted({f for g in gathered for f in g["files"]})}


def make_log(out: Path, rank: int) -> Callable[[str], None]:
    """Print on rank 0 and append to ``<out>/log.txt``."""

    def log(message: str) -> None:
        if rank == 0:
            print(message, flush=True)
            with open(out / "log.txt", "a") as f:
                f.write(message + "\n")

    return log


def new_optimizer(run: Run, lr: float) -> None:
    """SGD (fused on CUDA: with a GradScaler it skips inf steps without a host read) and a fresh GradScaler."""
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=run.args.amp == "fp16")
    fused = {"fused": True} if run.device.type == "cuda" else {}
    run.optimizer = torch.optim.SGD(run.model.param_groups(lr), lr=lr, momentum=0.9, weight_decay=5e-4, **fused)


def round_diagnostics(run: Run, state: dict) -> None:
    """Store and log the round's per-class coverage and precision of static, dynamic and hybrid labels."""
    counts = all_reduce_sum_(state["label_counts"].clone())
    entry = {n: diagnostics.summarize(counts[i]) for i, n in enumerate(diagnostics.LABEL_KINDS)}
    state["metrics"].setdefault("diagnostics", []).append({"round": state["round"], **entry})
    run.log(f"round {state['round']}: pseudo labels on the round's target crops against target ground truth "
            "(coverage = labelled share of the class's pixels, precision = correct share of the pixels labelled "
            "with the class; %, diagnostic only):\n" + diagnostics.table(entry, run.table.names))


def round_figure(run: Run, round_index: int, tgt: dict, labels: dict[str, Tensor]) -> None:
    """The round's last training batch: target crop | static | dynamic | hybrid (| ground truth with
    ``--diagnostics``), as the step computed them."""
    rows = []
    for i in range(tgt["image"].shape[0]):
        row = {"image": tgt["image"][i].permute(1, 2, 0).cpu().numpy()}
        row.update({k: v[i].cpu().numpy() for k, v in labels.items()})
        if "label" in tgt:
            row["gt"] = tgt["label"][i].cpu().numpy()
        rows.append(row)
    figures.pseudo_label_panel(rows, run.out / "figures" / f"pseudo_labels_round_{round_index:02d}.png",
                               class_names=run.table.names, palette=run.table.colours)


def scalars(run: Run, state: dict, prefix: str, values: dict[str, float]) -> None:
    """TensorBoard scalars (``--tensorboard``) at ``state["step"]``."""
    if run.tb is not None:
        for name, value in values.items():
            run.tb.add_scalar(f"{prefix}/{name}", value, state["step"])


def finish(run: Run, state: dict) -> None:
    """After training (the last checkpoint is written): metrics.json, the curves, the per-class table and the last
    line ``target mIoU: source-only X.XX -> adapted Y.YY`` (rank 0)."""
    a, m = run.args, state["metrics"]
    skipped = bad_samples(run, state)  # (a collective)
    if run.rank != 0:
        return
    metrics = {k: m[k] for k in ("source_only", "adapted", "source_only_continued", "rounds", "diagnostics",
                                 "signals") if k in m}
    names = run.table.names
    metrics.update(config=run.config, class_names=list(names), bad_samples=skipped)
    if run.subsets:
        metrics["class_subsets"] = {n: [names[k] for k in ks] for n, ks in run.subsets.items()}
    (run.out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    figures.training_curves(state["history"], run.out / "figures" / "training_curves.png")
    columns = {"source-only": m["source_only"]["iou"], "adapted": m["adapted"]["iou"]}
    if "source_only_continued" in m:
        columns["source-only, same budget"] = m["source_only_continued"]["iou"]
    what = "16-class protocol, n/a = not among the 16" if run.subsets else f"{len(names)} classes"
    run.log(f"per-class IoU on target val (%, {what}):\n" + iou_table(columns, names))
    if "source_only_continued" in m:
        run.log(f"source-only trained for the same total iterations ({a.source_iters} + "
                f"{a.rounds * a.round_iters}): {m['source_only_continued']['miou']:.2f}")
    if run.subsets:
        run.log("target mIoU over 16 classes (13 classes): source-only "
                f"{m['source_only']['miou16']:.2f} ({m['source_only']['miou13']:.2f}) -> adapted "
                f"{m['adapted']['miou16']:.2f} ({m['adapted']['miou13']:.2f})")
    run.log(f"target mIoU: source-only {m['source_only']['miou']:.2f} -> adapted {m['adapted']['miou']:.2f}")
