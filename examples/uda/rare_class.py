r"""DAFormer's rare class sampling (RCS): source crops drawn so that rare classes are seen more often.

DAFormer (``mmseg/datasets/uda_dataset.py``, ``tools/convert_datasets/gta.py``) counts each source label's pixels
per class once, then, for every training sample:

1. draws a class c with probability ``p_c = softmax((1 - f_c) / T)``, ``f_c`` the class's share of all
   labelled source pixels (pixel counts, not file counts), over the classes that occur (:func:`rcs_probabilities`);
2. draws uniformly one of the files holding more than ``min_pixels`` pixels of c (:func:`files_with_class`);
3. re-draws the random crop of that file until it holds more than ``min_pixels · min_crop_ratio`` pixels of c,
   at most ten times (:func:`crop_with_class`).

Here: :class:`RareClassStats` holds the counts (plain JSON, to cache in the run folder and restore on resume),
:class:`RareClassSampler` does steps 1-2 as a pure function of ``(seed, index)``, so a resumed run draws exactly
what the uninterrupted run would have, and :func:`crop_with_class` does step 3 on **source** labels.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IGNORE_INDEX = 255
STATS_FORMAT = "protocl.uda.rare_class_stats"
STATS_VERSION = 1


def class_pixel_counts(label: np.ndarray | Tensor, num_classes: int, *, ignore_index: int = IGNORE_INDEX
                       ) -> list[int]:
    r"""Pixels of each train id in one label map (DAFormer's per-file ``sample_class_stats``, dense).

    Shape:
        - label: any shape (usually :math:`(H, W)`), integer train ids in ``[0, K)`` or ``ignore_index``.
        - output: ``K`` ints.

    Args:
        label: the label map (numpy array or Tensor, any integer dtype).
        num_classes: K.
        ignore_index: the id that is not counted.

    Raises:
        ValueError: a value outside ``[0, K) ∪ {ignore_index}`` (raw label ids instead of train ids).
    """
    if num_classes < 1:
        raise ValueError(f"num_classes: expected a positive number of classes, got {num_classes}")
    values = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if not np.issubdtype(values.dtype, np.integer):
        raise ValueError(f"label: expected an integer dtype, got {values.dtype}")
    values = values.reshape(-1).astype(np.int64)
    values = values[values != ignore_index]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(f"label: expected train ids in [0, {num_classes}) or {ignore_index}, got values in "
                         f"[{values.min()}, {values.max()}]")
    return [int(n) for n in np.bincount(values, minlength=num_classes)]


@dataclass(frozen=True, eq=False)
class RareClassStats:
    r"""Per-file class pixel counts of a source dataset: what RCS needs, computed once per dataset.

    Attributes:
        files: the N file names (label files, in the dataset's order: the sampler returns indices into it).
        counts: :math:`(N, K)` int64, ``counts[i, c]`` = pixels of class c in file i (:func:`class_pixel_counts`
            at the resolution the labels were counted at; DAFormer counts full-resolution GTA labels).
    """

    files: tuple[str, ...]
    counts: np.ndarray

    def __post_init__(self) -> None:
        files = tuple(str(f) for f in self.files)
        counts = np.asarray(self.counts)
        if counts.ndim != 2:
            raise ValueError(f"counts: expected shape (N, K), got {counts.shape}")
        if counts.size and not np.issubdtype(counts.dtype, np.integer):
            raise ValueError(f"counts: expected integer pixel counts, got {counts.dtype}")
        counts = counts.astype(np.int64)
        if counts.shape[0] != len(files):
            raise ValueError(f"counts: expected one row per file ({len(files)}), got {counts.shape[0]}")
        if (counts < 0).any():
            raise ValueError("counts: expected non-negative pixel counts, got a negative one")
        counts.setflags(write=False)
        object.__setattr__(self, "files", files)
        object.__setattr__(self, "counts", counts)

    @property
    def num_classes(self) -> int:
        return int(self.counts.shape[1])

    @classmethod
    def from_labels(cls, files: Sequence[str], labels, num_classes: int, *, ignore_index: int = IGNORE_INDEX
                    ) -> RareClassStats:
        r"""Counts of ``labels`` (an iterable of label maps, one per file, in order)."""
        rows = [class_pixel_counts(label, num_classes, ignore_index=ignore_index) for label in labels]
        return cls(tuple(files), np.asarray(rows, dtype=np.int64).reshape(len(rows), num_classes))

    def to_json(self) -> str:
        r"""Plain JSON: ``{"format", "version", "num_classes", "files": [...], "counts": [[...], ...]}``."""
        return json.dumps({"format": STATS_FORMAT, "version": STATS_VERSION, "num_classes": self.num_classes,
                           "files": list(self.files), "counts": self.counts.tolist()})

    @classmethod
    def from_json(cls, text: str) -> RareClassStats:
        r"""Inverse of :meth:`to_json`; a wrong format, version or shape raises ``ValueError``."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"text: expected rare-class statistics as JSON, got invalid JSON ({err})") from None
        if not isinstance(data, dict) or data.get("format") != STATS_FORMAT:
            raise ValueError(f"text: expected a JSON object with format {STATS_FORMAT!r}, got "
                             f"{data.get('format') if isinstance(data, dict) else type(data).__name__!r}")
        if data.get("version") != STATS_VERSION:
            raise ValueError(f"text: expected version {STATS_VERSION}, got {data.get('version')!r}")
        k = data.get("num_classes")
        files, counts = data.get("files"), data.get("counts")
        if not isinstance(k, int) or not isinstance(files, list) or not isinstance(counts, list):
            raise ValueError("text: expected integer 'num_classes' and lists 'files' and 'counts'")
        return cls(tuple(files), np.asarray(counts, dtype=np.int64).reshape(len(counts), k))

    def save(self, path: str | os.PathLike) -> None:
        r"""Write :meth:`to_json` to ``path`` atomically (a temporary file, then a rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RareClassStats:
        r"""Read a file written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _check_counts(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts)
    if counts.ndim != 2:
        raise ValueError(f"counts: expected shape (N, K), got {counts.shape}")
    if counts.size and not np.issubdtype(counts.dtype, np.integer):
        raise ValueError(f"counts: expected integer pixel counts, got {counts.dtype}")
    return counts.astype(np.int64)


def rcs_probabilities(counts: np.ndarray, temperature: float = 0.01) -> np.ndarray:
    r"""DAFormer's class sampling probabilities ``p_c = softmax((1 - f_c) / T)``.

    ``f_c = n_c / Σ_k n_k`` with ``n_c`` the pixels of class c summed over all files (DAFormer sums its
    ``sample_class_stats`` pixel counts; the ignore id is never counted). Only classes with ``n_c > 0`` take
    part (DAFormer's ``overall_class_stats`` holds only those): the others get probability 0. Computed in
    float64 (DAFormer: float32).

    Shape:
        - counts: :math:`(N, K)` integer pixel counts (:attr:`RareClassStats.counts`).
        - output: :math:`(K,)` float64, summing to 1.

    Args:
        counts: per-file class pixel counts.
        temperature: T > 0 (DAFormer: 0.01); smaller T favours rare classes more.
    """
    counts = _check_counts(counts)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive temperature, got {temperature}")
    totals = counts.sum(0).astype(np.float64)
    if not totals.sum() > 0:
        raise ValueError("counts: expected at least one counted pixel, got none")
    present = totals > 0
    logits = (1.0 - totals / totals.sum()) / temperature
    logits = np.where(present, logits, -np.inf)
    e = np.exp(logits - logits[present].max())
    return e / e.sum()


def files_with_class(counts: np.ndarray, min_pixels: int = 3000) -> list[np.ndarray]:
    r"""Per class, the indices of the files with **more than** ``min_pixels`` pixels of it (DAFormer's
    ``samples_with_class`` filter ``pixels > rcs_min_pixels``).

    Shape:
        - counts: :math:`(N, K)`.
        - output: K int64 arrays of file indices, ascending.
    """
    counts = _check_counts(counts)
    return [np.flatnonzero(counts[:, c] > min_pixels).astype(np.int64) for c in range(counts.shape[1])]


class RareClassSampler:
    r"""Draws ``(class, file index)`` as DAFormer's ``get_rare_class_sample``, deterministically per index.

    The class probabilities are :func:`rcs_probabilities` restricted to the classes with at least one file in
    :func:`files_with_class` and renormalised (DAFormer asserts every occurring class has such a file instead;
    restricting keeps the relative probabilities of the others). :meth:`sample` is a pure function of
    ``(seed, index)``: a run resumed at step t calls it with the same indices and draws the same samples.

    Args:
        stats: the source dataset's counts.
        temperature: RCS temperature T (DAFormer: 0.01).
        min_pixels: a file is eligible for class c with more than this many pixels of c (DAFormer: 3000).
        seed: the run's seed (a non-negative int).

    Attributes:
        probabilities: :math:`(K,)` float64, the class distribution actually sampled (0 for excluded classes).
        files: per class, the eligible file indices.
    """

    def __init__(self, stats: RareClassStats, *, temperature: float = 0.01, min_pixels: int = 3000,
                 seed: int = 0) -> None:
        if not isinstance(stats, RareClassStats):
            raise TypeError(f"stats: expected RareClassStats, got {type(stats).__name__}")
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        if min_pixels < 0:
            raise ValueError(f"min_pixels: expected a non-negative pixel count, got {min_pixels}")
        self.stats, self.temperature = stats, float(temperature)
        self.min_pixels, self.seed = int(min_pixels), int(seed)
        self.files = files_with_class(stats.counts, self.min_pixels)
        p = rcs_probabilities(stats.counts, temperature)
        p = np.where([len(f) > 0 for f in self.files], p, 0.0)
        if not p.sum() > 0:
            raise ValueError(f"stats: expected a class with a file holding more than min_pixels={min_pixels} "
                             f"of its pixels, got none")
        self.probabilities = p / p.sum()

    def rng(self, index: int, stream: int = 0) -> np.random.Generator:
        r"""The generator of draw ``index``: ``SeedSequence([seed, index, stream])``. Stream 0 is
        :meth:`sample`'s; pass another stream for the same draw's crop (e.g. 1 for :func:`crop_with_class`)."""
        if index < 0 or stream < 0:
            raise ValueError(f"index: expected non-negative index and stream, got {index}, {stream}")
        return np.random.default_rng(np.random.SeedSequence([self.seed, int(index), int(stream)]))

    def sample(self, index: int) -> tuple[int, int]:
        r"""Draw ``index`` (e.g. the global sample number ``step · batch + slot``): the class c ~
        :attr:`probabilities`, then a file uniformly among :attr:`files`\ ``[c]``. Returns ``(c, file)``."""
        rng = self.rng(index)
        c = int(rng.choice(len(self.probabilities), p=self.probabilities))
        files = self.files[c]
        return c, int(files[rng.integers(len(files))])


def random_crop_origin(size: tuple[int, int], crop: tuple[int, int], rng: np.random.Generator, *,
                       label: np.ndarray | None = None, cat_max_ratio: float = 1.0,
                       ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    r"""mmseg's ``RandomCrop`` box: ``top ~ U{0..max(H - h, 0)}``, then ``left ~ U{0..max(W - w, 0)}``.

    With ``cat_max_ratio < 1`` (DAFormer's source pipelines: 0.75) the box is re-drawn, at most ten times, until
    the largest class holds less than ``cat_max_ratio`` of the crop's labelled pixels and at least two classes
    occur; the eleventh box is kept unchecked. That reads ``label``: give it **source** labels only. A target
    crop takes ``cat_max_ratio=1`` and no label (DAFormer's first release read the target's ground truth
    here, lhoyer/DAFormer#6).

    Returns:
        ``(top, left)``; the crop is ``label[top:top + h, left:left + w]`` (smaller where the image is).
    """
    (hh, ww), (h, w) = size, crop
    if h < 1 or w < 1:
        raise ValueError(f"crop: expected a positive size (h, w), got {crop}")

    def draw() -> tuple[int, int]:
        top = int(rng.integers(0, max(hh - h, 0) + 1))
        return top, int(rng.integers(0, max(ww - w, 0) + 1))

    top, left = draw()
    if cat_max_ratio < 1.0:
        if label is None or tuple(label.shape[:2]) != (hh, ww):
            raise ValueError(f"label: expected the {size} label map for cat_max_ratio < 1, got "
                             f"{None if label is None else label.shape}")
        for _ in range(10):
            cnt = np.bincount(label[top:top + h, left:left + w].reshape(-1).astype(np.int64))
            if ignore_index < len(cnt):
                cnt[ignore_index] = 0
            cnt = cnt[cnt > 0]
            if len(cnt) > 1 and cnt.max() / cnt.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def crop_with_class(label: np.ndarray | Tensor, crop: tuple[int, int], c: int, *, rng: np.random.Generator,
                    min_pixels: int = 3000, min_crop_ratio: float = 0.5, tries: int = 10,
                    cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> tuple[int, int]:
    r"""DAFormer's RCS crop: re-draw the random crop until it holds more than ``min_pixels · min_crop_ratio``
    pixels of class ``c``, checking at most ``tries`` crops; the crop after the last failed check is kept
    unchecked (DAFormer: ``for j in range(10): if n_class > min_pixels * min_crop_ratio: break; s1 =
    source[i1]``, each ``source[i1]`` a fresh :func:`random_crop_origin`). ``min_crop_ratio <= 0`` keeps the
    first crop.

    For **source** labels only: it reads the labels, which a target image must never do.

    Shape:
        - label: :math:`(H, W)` train ids of the source image, at the resolution the crop is taken at
          (DAFormer: after its resize to 1280 × 720, whereas ``min_pixels`` filtered full-resolution counts).

    Args:
        label: the source label map.
        crop: ``(h, w)``.
        c: the class drawn by :class:`RareClassSampler`.
        rng: the draw's generator (e.g. ``sampler.rng(index, stream=1)``).
        min_pixels, min_crop_ratio, tries: DAFormer's 3000, 0.5, 10.
        cat_max_ratio: the box rule of each crop (:func:`random_crop_origin`; DAFormer's source: 0.75).
        ignore_index: the unlabelled id, for ``cat_max_ratio``.

    Returns:
        ``(top, left)`` of the crop.
    """
    values = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if values.ndim != 2:
        raise ValueError(f"label: expected a label map (H, W), got shape {values.shape}")
    if tries < 0:
        raise ValueError(f"tries: expected a non-negative number of checks, got {tries}")
    h, w = crop

    def draw() -> tuple[int, int]:
        return random_crop_origin(values.shape, crop, rng, label=values, cat_max_ratio=cat_max_ratio,
                                  ignore_index=ignore_index)

    top, left = draw()
    if min_crop_ratio > 0:
        threshold = min_pixels * min_crop_ratio
        for _ in range(tries):
            if np.count_nonzero(values[top:top + h, left:left + w] == c) > threshold:
                break
            top, left = draw()
    return top, left
