r"""What round decisions score on (:mod:`uda.decisions`): a seeded subset of the target-train images spread over the
target's folders (:func:`score_subset`), stacked in batches (:func:`batches`) of a size bounded by memory
(:func:`score_batch_size`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

__all__ = ["SCORE_COPIES", "score_subset", "score_batch_size", "batches"]

SCORE_COPIES = 3  # K x H x W float32 tensors alive at once per scored image (probabilities, flipped logits, temp)


def _golden_order(n: int, offset: float) -> list[int]:
    """0..n-1 in an order whose every prefix is spread over the range: ``floor(n * frac(offset + j / phi))``,
    repeats skipped, the rest appended in order."""
    order, seen, phi = [], set(), (1 + 5 ** 0.5) / 2
    for j in range(n):
        i = min(n - 1, int(n * ((offset + j / phi) % 1.0)))
        if i not in seen:
            seen.add(i)
            order.append(i)
    return order + [i for i in range(n) if i not in seen]


def score_subset(images: list[str | Path], count: int, seed: int) -> list[int]:
    """Indices of ``count`` of ``images`` (paths), a seeded sample spread over the folders they are in.

    The folders below the images' common root form a tree (Cityscapes: city; ACDC: condition / split /
    sequence; Dark Zurich: split / condition / sequence); the sample takes folders round-robin at every level
    (sibling folders in a seeded order), and within a folder images spread over its sorted list (a seeded
    offset, golden-ratio steps). A single folder (``--target folder``): images spread over the sorted list."""
    if count >= len(images):
        return list(range(len(images)))
    g = torch.Generator().manual_seed(int(seed))
    parts = [Path(p).parent.parts for p in images]
    root = 0
    while all(len(p) > root for p in parts) and len({p[root] for p in parts}) == 1:
        root += 1

    def spread(members: list[int], depth: int):
        here = [i for i in members if len(parts[i]) == depth]  # images directly in this folder
        below: dict[str, list[int]] = {}
        for i in members:
            if len(parts[i]) > depth:
                below.setdefault(parts[i][depth], []).append(i)
        streams = []
        if here:
            ordered = sorted(here, key=lambda i: str(images[i]))
            streams.append(iter([ordered[j] for j in _golden_order(len(ordered), float(torch.rand((), generator=g)))]))
        keys = sorted(below)
        keys = [keys[j] for j in torch.randperm(len(keys), generator=g).tolist()]
        streams += [spread(below[k], depth + 1) for k in keys]
        while streams:  # round-robin over the folder's own images and its sub-folders
            for stream in list(streams):
                try:
                    yield next(stream)
                except StopIteration:
                    streams.remove(stream)

    picked = []
    for i in spread(list(range(len(images))), root):
        picked.append(i)
        if len(picked) == count:
            break
    return picked


def score_batch_size(width: int, height: int, num_classes: int, memory_mb: int) -> int:
    """Images per scoring batch: about ``memory_mb`` MiB of score tensors (:data:`SCORE_COPIES` float32
    ``K x H x W`` maps and two int64 ``H x W`` argmaxes per image), at least 1."""
    per_image = (SCORE_COPIES * 4 * num_classes + 2 * 8) * width * height
    return max(1, int(memory_mb * 2**20 // per_image))


def batches(data: Dataset, size: int = 8):
    """The items of ``data`` in order, stacked ``size`` at a time (a batch ends early where the image size changes:
    images resized by their short side differ in width when aspect ratios do). No DataLoader: it would draw from
    the global RNG and move the run's."""
    items: list = []
    for j in range(len(data)):
        item = data[j]
        if items and (len(items) == size or item["image"].shape != items[0]["image"].shape):
            yield _stack(items)
            items = []
        items.append(item)
    if items:
        yield _stack(items)


def _stack(items: list) -> dict:
    batch = {"image": torch.stack([it["image"] for it in items])}
    if "skipped" in items[0]:
        batch["skipped"] = torch.stack([torch.as_tensor(it["skipped"]) for it in items])
    return batch
