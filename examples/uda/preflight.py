r"""Pre-flight check of a dataset: every file of the chosen splits read once before training starts.

For each sample (:class:`uda.datasets.Sample`) :func:`check_sample` runs the checks the training readers run
(:mod:`uda.labels`), on the whole file:

- the image opens and decodes completely (``convert("RGB")`` decodes every pixel, so a truncated PNG fails
  here and not after a day of training);
- the label (when the split has one) decodes, is in the mode its format expects (Cityscapes/GTA5: a
  single-channel id map, mode L, P or I, never an RGB colour rendering; SYNTHIA: a 16-bit RGB PNG), holds ids
  in its format's range (Cityscapes/GTA5: 0-255, so not an instance-id file) and has its image's size or a
  rescale of it (same aspect ratio within :data:`uda.labels.ASPECT_TOLERANCE`, resized nearest when read: a
  few GTA5 labels differ in size from their image).

:func:`check_data` runs it over all splits in worker processes with a progress bar, collects every bad file
and raises one ``ValueError`` that lists them all by path with the reason (a dataset with several broken
files is fixed in one go). Under several processes (``rank``/``world``) each checks its share and ``gather``
hands every rank's result to every rank, so all ranks report the same bad files and stop together. Cost: one full decode of every image and label, i.e. about one epoch of data
loading without the augmentation; see docs/reproduce.md for figures measured on the demo and estimated for
GTA5.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .datasets import Sample
from .labels import BadSampleError, check_label_ids, check_label_size, decode_image, decode_label_ids


def check_sample(sample: Sample) -> tuple[list[str], int]:
    """Check one sample's image and label files: ``(problems, bytes read)``; each problem names its file."""
    problems, size, nbytes = [], None, 0
    for path in (sample.image, sample.label):
        if path is not None:
            try:
                nbytes += os.path.getsize(path)
            except OSError as error:
                problems.append(f"{str(path)!r} cannot be read ({type(error).__name__}: {error.strerror or error})")
                return problems, nbytes
    try:
        size = decode_image(sample.image).size
    except BadSampleError as error:
        problems.append(str(error))
    if sample.label is not None:
        try:
            ids = decode_label_ids(sample.label, sample.label_format)
            check_label_ids(ids, sample.label, sample.label_format)
            if size is not None:
                check_label_size((ids.shape[1], ids.shape[0]), size, sample.label, sample.image)
        except BadSampleError as error:
            problems.append(str(error))
    return problems, nbytes


def default_workers() -> int:
    """The CPUs this process may run on (its affinity mask, which SLURM and containers restrict), at most 16."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    return max(1, min(16, available))


def scan(splits: Mapping[str, Sequence[Sample]], *, workers: int | None = None, progress: bool = True
         ) -> tuple[dict, list[tuple[str, str]]]:
    """Run :func:`check_sample` over every sample of ``splits`` (name -> samples): ``(stats, bad)`` with ``bad``
    the ``(split name, problem)`` of every bad file, in order. ``workers``: processes (``0``: in this process;
    ``None``: :func:`default_workers`); ``progress``: a tqdm bar on stderr."""
    workers = default_workers() if workers is None else int(workers)
    if workers < 0:
        raise ValueError(f"expected workers >= 0, got {workers}")
    samples = [(name, s) for name, split in splits.items() for s in split]
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the examples extra; without it, no bar
        def tqdm(iterable, **_):
            return iterable
    start = time.perf_counter()
    items = [s for _, s in samples]
    bar_kw = {"total": len(items), "desc": "checking data", "unit": "sample", "disable": not progress,
              "mininterval": 1.0}
    if workers == 0 or len(items) < 2:
        results = list(tqdm(map(check_sample, items), **bar_kw))
    else:
        chunk = max(1, min(64, len(items) // (workers * 8)))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(check_sample, items, chunksize=chunk), **bar_kw))
    seconds = time.perf_counter() - start
    bad = [(name, problem) for (name, _), (problems, _) in zip(samples, results) for problem in problems]
    nbytes = sum(n for _, n in results)
    files = sum(1 + (s.label is not None) for s in items)
    stats = {"files": files, "samples": len(items), "bytes": nbytes, "seconds": round(seconds, 3),
             "files_per_s": round(files / max(seconds, 1e-9), 1),
             "mb_per_s": round(nbytes / 2**20 / max(seconds, 1e-9), 1), "workers": workers}
    return stats, bad


def report(bad: Sequence[tuple[str, str]], splits: Mapping[str, Sequence[Sample]], files: int) -> str:
    """The message of the ``ValueError`` for ``bad`` files: every one of them, by path with the reason."""
    lines = "\n".join(f"  [{name}] {problem}" for name, problem in bad)
    return (f"pre-flight data check: {len(bad)} bad file(s) among the {files} files of "
            f"{', '.join(f'{name} ({len(split)} samples)' for name, split in splits.items())}; fix or remove them "
            f"(--on-bad-sample skip trains without them, --no-check-data skips this check):\n{lines}")


def summary(stats: dict, splits: Mapping[str, Sequence[Sample]]) -> str:
    """The log line of a passed check."""
    return (f"pre-flight data check: {stats['files']} files ({stats['bytes'] / 2**20:.1f} MiB) of "
            f"{', '.join(f'{name} {len(split)}' for name, split in splits.items())} samples fine in "
            f"{stats['seconds']:.1f} s ({stats['files_per_s']:.0f} files/s, {stats['mb_per_s']:.0f} MiB/s, "
            f"{stats['workers']} worker process(es))")


def merge_stats(results: Sequence[tuple[dict, list]]) -> tuple[dict, list[tuple[str, str]]]:
    """One ``(stats, bad)`` from the :func:`scan` results of several processes (their shares of the splits):
    files, samples and bytes summed, the slowest time, the bad files of all in rank order."""
    stats = dict(results[0][0])
    stats.update({k: sum(s[k] for s, _ in results) for k in ("files", "samples", "bytes")})
    stats["seconds"] = max(s["seconds"] for s, _ in results)
    stats["files_per_s"] = round(stats["files"] / max(stats["seconds"], 1e-9), 1)
    stats["mb_per_s"] = round(stats["bytes"] / 2**20 / max(stats["seconds"], 1e-9), 1)
    return stats, [b for _, bad in results for b in bad]


def check_data(splits: Mapping[str, Sequence[Sample]], *, workers: int | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None, rank: int = 0, world: int = 1,
               gather: Callable[[tuple[dict, list]], Sequence[tuple[dict, list]]] | None = None,
               report_path: str | Path | None = None) -> dict:
    """Check every sample of ``splits`` (name -> samples) with :func:`check_sample` (see :func:`scan`).

    Returns ``{"files", "samples", "bytes", "seconds", "files_per_s", "mb_per_s", "workers"}`` (of all ranks),
    logs one line through ``log`` when given and writes the statistics to ``report_path`` (JSON) when given.
    Raises one ``ValueError`` listing every bad file (path and reason) when any is bad.

    Several processes: rank ``rank`` of ``world`` checks ``split[rank::world]`` of every split, and ``gather``
    (required when ``world > 1``) takes this rank's ``(stats, bad)`` and returns every rank's, in rank order
    (e.g. ``torch.distributed.all_gather_object``): every rank then raises, or passes, on the bad files of all.
    """
    if not 0 <= rank < world:
        raise ValueError(f"expected 0 <= rank < world, got rank={rank}, world={world}")
    if world > 1 and gather is None:
        raise ValueError(f"expected gather (every rank's scan result) with world={world} > 1, got None")
    shard = {name: split[rank::world] for name, split in splits.items()} if world > 1 else splits
    stats, bad = scan(shard, workers=workers, progress=progress)
    if world > 1:
        stats, bad = merge_stats(gather((stats, bad)))
    if bad:
        raise ValueError(report(bad, splits, stats["files"]))
    if log is not None:
        log(summary(stats, splits))
    if report_path is not None:
        write_report(stats, report_path)
    return stats


def write_report(stats: dict, path: str | Path) -> None:
    """Store the statistics of a passed check as JSON (``<out>/data_check.json``)."""
    import json

    Path(path).write_text(json.dumps(stats, indent=2) + "\n")
