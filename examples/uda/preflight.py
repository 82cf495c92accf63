r"""Pre-flight check of a dataset: every file of the chosen splits read once before training starts.

For each sample (:class:`uda.data.Sample`) :func:`check_sample` runs the checks the training readers run,
on the whole file:

- the image opens and decodes completely (``convert("RGB")`` decodes every pixel, so a truncated PNG fails
  here and not after a day of training);
- the label (when the split has one) decodes, is in the mode its format expects (Cityscapes/GTA5: a
  single-channel id map, mode L, P or I, never an RGB colour rendering; SYNTHIA: a 16-bit RGB PNG), holds ids
  in its format's range (Cityscapes/GTA5: 0-255, so not an instance-id file) and has its image's size or a
  rescale of it (same aspect ratio within :data:`uda.data.ASPECT_TOLERANCE`, resized nearest when read: a
  few GTA5 labels differ in size from their image).

:func:`check_data` runs it over all splits in worker processes with a progress bar, collects every bad file
and raises one ``ValueError`` that lists them all by path with the reason (a dataset with several broken
files is fixed in one go). Cost: one full decode of every image and label, i.e. about one epoch of data
loading without the augmentation; see docs/reproduce.md for figures measured on the demo and estimated for
GTA5.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .data import (
    BadSampleError,
    Sample,
    check_label_ids,
    check_label_size,
    decode_image,
    decode_label_ids,
)


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


def check_data(splits: Mapping[str, Sequence[Sample]], *, workers: int | None = None, progress: bool = True,
               log: Callable[[str], None] | None = None) -> dict:
    """Check every sample of ``splits`` (name -> samples) with :func:`check_sample` (see :func:`scan`).

    Returns ``{"files", "samples", "bytes", "seconds", "files_per_s", "mb_per_s", "workers"}`` and logs one line
    through ``log`` when given. Raises one ``ValueError`` listing every bad file (path and reason) when any is
    bad.
    """
    stats, bad = scan(splits, workers=workers, progress=progress)
    if bad:
        raise ValueError(report(bad, splits, stats["files"]))
    if log is not None:
        log(summary(stats, splits))
    return stats


def write_report(stats: dict, path: str | Path) -> None:
    """Store the statistics of a passed check as JSON (``<out>/data_check.json``)."""
    import json

    Path(path).write_text(json.dumps(stats, indent=2) + "\n")
