r"""Static pseudo labels of a round (stage 2): one pass of the model over the whole target train split.

:func:`make_static_labels` runs the model on every target train image (sharded over ranks), merges the
class-balanced thresholds over ranks (:class:`protocl.ClassBalancedThresholds`), writes
``protocl.static_pseudo_label`` maps to ``<out>/pseudo_labels/round_XX`` (atomically: a ``.tmp`` folder renamed,
then a ``.complete`` marker with the thresholds) and hands them to the target stream. A round whose labels are
complete on disk (a resumed run) is not recomputed.
"""

from __future__ import annotations

import json
import shutil

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader

import protocl
from protocl import IGNORE_INDEX
from protocl.distributed import all_reduce_sum_

from . import dist
from .loading import PseudoLabelSet, skip_records
from .stream import ignore_stop_signals
from .run import Run, forward

__all__ = ["make_static_labels"]


@torch.no_grad()
def make_static_labels(run: Run, round_index: int) -> list[float]:
    """Static labels of the whole target train split (sharded over ranks; class-balanced thresholds merged),
    written to ``<out>/pseudo_labels/round_XX`` and handed to the target stream; returns the class thresholds.
    A round whose labels are complete on disk (a resumed run) is not recomputed."""
    a, final = run.args, run.out / "pseudo_labels" / f"round_{round_index:02d}"
    run.target_set.pseudo_dir = final
    run.target_stream.restart()  # the stream's workers hold a copy of the dataset
    marker = final / ".complete"
    if marker.is_file():
        return json.loads(marker.read_text())["class_thresholds"]
    tmp = final.with_name(final.name + ".tmp")
    if run.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    run.model.eval()
    shard = run.target_train[run.rank::run.world]
    loader = DataLoader(PseudoLabelSet(shard, resize=a.resize, on_bad_sample=a.on_bad_sample), batch_size=1,
                        num_workers=min(a.workers, 2), pin_memory=run.device.type == "cuda",
                        worker_init_fn=ignore_stop_signals)
    thresholds = protocl.ClassBalancedThresholds(run.num_classes, proportion=a.proportion, sync=False).to(run.device)
    cache, budget = [], a.pseudo_cache_mb * 2**20  # logits kept for the second pass, within the budget

    def full_logits(images: Tensor) -> Tensor:
        return F.interpolate(forward(run, run.model, images)[0], size=images.shape[-2:], mode="bilinear",
                             align_corners=False)

    skipped = set()  # --on-bad-sample skip: unreadable images, left out of the thresholds, labelled all-ignore
    for index, batch in enumerate(loader):
        for path, message in skip_records(batch):
            skipped.add(index)
            run.log(f"warning: skipped {path!r}, left out of round {round_index}'s static labels "
                    f"(--on-bad-sample skip): {message}")
        if index in skipped:
            cache.append(None)
            continue
        logits = full_logits(batch["image"])
        thresholds.update(logits)
        budget -= logits.numel() * logits.element_size()
        cache.append(logits.cpu() if budget > 0 else None)
    all_reduce_sum_(thresholds.histogram)  # merged thresholds: identical on every rank
    class_thresholds = thresholds.compute()
    covered = torch.zeros(2, dtype=torch.int64, device=run.device)  # labelled pixels, all pixels
    second_pass = loader if any(c is None for i, c in enumerate(cache) if i not in skipped) else [None] * len(cache)
    for index, (batch, cached) in enumerate(zip(second_pass, cache)):
        if index in skipped:  # the training set skips this image too; its label file just has to exist
            Image.new("L", (1, 1), IGNORE_INDEX).save(tmp / f"{shard[index].name}.png")
            continue
        logits = cached.to(run.device) if cached is not None else full_logits(batch["image"])
        labels = protocl.static_pseudo_label(logits, class_thresholds=class_thresholds, proportion=a.proportion)
        covered += torch.stack([torch.count_nonzero(labels != IGNORE_INDEX),
                                torch.full((), labels.numel(), dtype=torch.int64, device=labels.device)])
        Image.fromarray(labels[0].to(torch.uint8).cpu().numpy()).save(tmp / f"{shard[index].name}.png")
    all_reduce_sum_(covered)
    dist.barrier()
    if run.rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker.write_text(json.dumps({"class_thresholds": class_thresholds.tolist()}))
    dist.barrier()
    run.model.train()
    finite = class_thresholds[torch.isfinite(class_thresholds)]
    run.log(f"round {round_index}: static labels for {len(run.target_train)} target images, coverage "
            f"{100 * float(covered[0]) / max(1, int(covered[1])):.1f}%, class thresholds median "
            f"{float(finite.median()) if finite.numel() else float('nan'):.3f} ({finite.numel()} classes seen)")
    return class_thresholds.tolist()
