r"""The training and evaluation datasets and their transforms.

:class:`TrainSet` (crops for training), :class:`EvalSet` (whole images at the evaluation size) and
:class:`PseudoLabelSet` (target images for the static pseudo labels) read a list of :class:`datasets.Sample`
through :mod:`labels` (one decoding path for every layout). Training samples go through: resize of the short
side, random scale, random crop (padding with ignore when needed), horizontal flip. Every random choice of a
sample comes from the seed handed in with its index (``dataset[(index, seed)]``, :mod:`stream`), so a batch
depends only on its place in the stream: the same whatever the number of workers, and reproducible after a
resume. Images stay uint8 RGB; the model subtracts the mean (see :mod:`model`).

Bad files (:class:`labels.BadSampleError`, a ``ValueError`` naming the file): the datasets take
``on_bad_sample``: ``"error"`` (default) raises; ``"skip"`` replaces the sample deterministically (see
:class:`TrainSet`) and reports it in the batch (:func:`skip_records`). :mod:`preflight` runs the same checks over
whole splits before training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from protocl import IGNORE_INDEX

from .datasets import Sample
from .labels import BadSampleError, decode_image, error_reason, read_sample_label

ON_BAD_SAMPLE = ("error", "skip")


def short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(W, H) with the short side resized to ``short`` (aspect kept)."""
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_pair(image: Image.Image, labels: list[Image.Image], size: tuple[int, int]):
    return image.resize(size, Image.BILINEAR), [lab.resize(size, Image.NEAREST) for lab in labels]


def skip_record(error: BadSampleError) -> str:
    """One line of a ``skipped_files`` entry: ``"<path>\t<message>"``."""
    return f"{error.path or '?'}\t{error}"


def skip_records(batch: dict) -> list[tuple[str, str]]:
    """The ``(path, message)`` of every bad file a batch (or an item) passed over (``on_bad_sample="skip"``);
    reads the CPU tensor ``skipped`` only, never a device value."""
    if "skipped" not in batch or not int(torch.as_tensor(batch["skipped"]).sum()):
        return []
    entries = batch["skipped_files"]
    entries = [entries] if isinstance(entries, str) else entries
    records = []
    for entry in entries:
        for line in entry.splitlines():
            if line:
                path, _, message = line.partition("\t")
                records.append((path, message))
    return records


class SkipCounter:
    """An iterable over ``loader`` that keeps the :func:`skip_records` of the batches it yields (in
    :attr:`pending`, emptied by :meth:`take`), for loaders that another function iterates (the evaluation)."""

    def __init__(self, loader) -> None:
        self.loader, self.pending = loader, []

    def __iter__(self):
        for batch in self.loader:
            self.pending += skip_records(batch)
            yield batch

    def __len__(self) -> int:
        return len(self.loader)

    def take(self) -> list[tuple[str, str]]:
        pending, self.pending = self.pending, []
        return pending


def _check_on_bad_sample(value: str) -> str:
    if value not in ON_BAD_SAMPLE:
        raise ValueError(f"expected on_bad_sample in {ON_BAD_SAMPLE}, got {value!r}")
    return value


class TrainSet(Dataset):
    r"""Training crops: ``dataset[(index, seed)]`` -> dict of ``image`` uint8 (3, c, c), ``index`` and

    - ``label`` uint8 (c, c), the ground truth, when ``labels=True`` (for the target set it is read only for
      the opt-in ``--diagnostics``; without them the target ground truth is never opened);
    - ``static`` uint8 (c, c) read from ``<pseudo_dir>/<name>.png`` when ``pseudo_dir`` is set;
    - with ``on_bad_sample="skip"`` only: ``skipped`` (int64 scalar, how many bad samples were passed over to
      produce this one, normally 0) and ``skipped_files`` (str, one ``"<path>\t<message>"`` line per bad file
      passed over, empty when none; :func:`skip_records` parses them). Collated, they are a tensor and a list of
      str per batch.

    Label maps stay uint8 (train ids and 255 fit a byte) so that the host-to-device copy moves an eighth of the
    bytes of int64; the trainer widens them to int64 on the device. Static pseudo labels are stored at the
    short-side-resized resolution (see :func:`pseudo_label_size`).

    A bad file (see the module's docstring) raises :class:`BadSampleError` naming it with
    ``on_bad_sample="error"`` (default). With ``"skip"`` the sample is replaced by the next index of the dataset
    (wrapping around) under the same augmentation seed, so a batch is still a pure function of its place in the
    stream and a resume stays exact; if every sample is bad the error is raised.
    """

    def __init__(self, samples: Sequence[Sample], *, resize: int, crop: int, scales: Sequence[float] = (1.0,),
                 flip: bool = True, pseudo_dir: str | Path | None = None, labels: bool = True,
                 on_bad_sample: str = "error") -> None:
        self.samples = list(samples)
        self.resize, self.crop, self.scales, self.flip = resize, crop, tuple(scales), flip
        self.pseudo_dir = None if pseudo_dir is None else Path(pseudo_dir)
        self.labels = labels
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        if self.on_bad_sample == "error":
            return self._load(index, seed)
        skipped = []
        for attempt in range(len(self.samples)):
            try:
                out = self._load((index + attempt) % len(self.samples), seed)
            except BadSampleError as error:
                skipped.append(skip_record(error))
                continue
            out["skipped"] = torch.tensor(len(skipped))
            out["skipped_files"] = "\n".join(skipped)
            return out
        raise BadSampleError(f"every one of the {len(self.samples)} samples is bad (on_bad_sample='skip' has "
                             f"nothing to use instead), e.g. {skipped[0].split(chr(9), 1)[-1]}")

    def _static_label(self, sample: Sample, size: tuple[int, int]) -> Image.Image:
        path = self.pseudo_dir / f"{sample.name}.png"
        try:
            with Image.open(path) as file:
                static = file.copy()
        except MemoryError:
            raise
        except Exception as error:
            raise BadSampleError(f"static pseudo label {str(path)!r} does not decode ({error_reason(error)})",
                                 path) from error
        if static.size != size:
            raise ValueError(f"expected static labels of size {size} in {self.pseudo_dir}, got {static.size} "
                             f"({str(path)!r})")
        return static

    def _load(self, index: int, seed: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng(seed)
        sample = self.samples[index]
        image = decode_image(sample.image)
        size = short_side_size(image.size, self.resize)
        names, labels = [], []
        if self.labels:
            gt = (read_sample_label(sample, image.size) if sample.label
                  else np.full(image.size[::-1], IGNORE_INDEX, np.uint8))
            names.append("label")
            labels.append(Image.fromarray(gt))
        image, labels = resize_pair(image, labels, size)
        if self.pseudo_dir is not None:
            names.append("static")
            labels.append(self._static_label(sample, size))
        scale = float(rng.choice(self.scales))
        scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        image, labels = resize_pair(image, labels, scaled)
        arrays = [np.asarray(image)] + [np.asarray(lab, dtype=np.uint8) for lab in labels]
        arrays = self.crop_window(arrays, rng)
        if self.flip and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        out = {"image": torch.from_numpy(np.ascontiguousarray(arrays[0].transpose(2, 0, 1))),
               "index": torch.tensor(index)}
        for name, array in zip(names, arrays[1:]):
            out[name] = torch.from_numpy(np.ascontiguousarray(array))
        return out

    def crop_window(self, arrays: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
        """The training crop of the image and its label maps (:func:`random_crop`; subclasses choose the window
        otherwise, e.g. :class:`uda.mean_teacher.SourceCrops`)."""
        return random_crop(arrays, self.crop, rng)


def pad_to_crop(arrays: list[np.ndarray], crop: int) -> list[np.ndarray]:
    """Pad the image (0) and the label maps (ignore) at the bottom and right to at least crop×crop."""
    h, w = arrays[0].shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        arrays = [np.pad(a, ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2),
                         constant_values=0 if i == 0 else IGNORE_INDEX) for i, a in enumerate(arrays)]
    return arrays


def random_crop(arrays: list[np.ndarray], crop: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Crop the same random crop×crop window from every array; pad (image 0, labels ignore) when smaller."""
    arrays = pad_to_crop(arrays, crop)
    h, w = arrays[0].shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    return [a[top:top + crop, left:left + crop] for a in arrays]


class EvalSet(Dataset):
    """Evaluation: image resized to ``size`` = (W, H), train-id label (uint8) at its full resolution.

    A bad file raises :class:`BadSampleError` naming it (``on_bad_sample="error"``). With ``"skip"`` the sample
    is left out of the score: a black image with an all-ignore label of ``size`` (it adds nothing to the
    confusion matrix), and every item carries ``skipped`` (0 or 1) and ``skipped_files`` as in :class:`TrainSet`.
    """

    def __init__(self, samples: Sequence[Sample], *, size: tuple[int, int], on_bad_sample: str = "error") -> None:
        self.samples, self.size = list(samples), tuple(size)
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            out = self._load(index)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                raise
            w, h = self.size
            return {"image": torch.zeros(3, h, w, dtype=torch.uint8),
                    "label": torch.full((h, w), IGNORE_INDEX, dtype=torch.uint8), "index": torch.tensor(index),
                    "skipped": torch.tensor(1), "skipped_files": skip_record(error)}
        if self.on_bad_sample == "skip":
            out["skipped"], out["skipped_files"] = torch.tensor(0), ""
        return out

    def _load(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = decode_image(sample.image)
        label = read_sample_label(sample, image.size)
        image = np.asarray(image.resize(self.size, Image.BILINEAR))
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(label), "index": torch.tensor(index)}


def pseudo_label_size(sample: Sample, short: int) -> tuple[int, int]:
    """The (W, H) at which the static pseudo labels of ``sample`` are stored (short side ``short``); reads the
    image header only; :class:`BadSampleError` naming the image when it cannot be opened."""
    try:
        with Image.open(sample.image) as image:
            return short_side_size(image.size, short)
    except MemoryError:
        raise
    except Exception as error:
        raise BadSampleError(f"image {str(sample.image)!r} does not open ({error_reason(error)})",
                             sample.image) from error


class PseudoLabelSet(Dataset):
    """Target train images resized on the short side (no augmentation), for static pseudo labels.

    A bad image raises :class:`BadSampleError` naming it (``on_bad_sample="error"``); with ``"skip"`` the item
    is a black image of the size the header gives (or 1x1 when even the header is unreadable) with
    ``skipped`` 1 and ``skipped_files``; the caller leaves it out of the thresholds and writes an all-ignore
    label for it (the training set skips that image anyway).
    """

    def __init__(self, samples: Sequence[Sample], *, resize: int, on_bad_sample: str = "error") -> None:
        self.samples, self.resize = list(samples), resize
        self.on_bad_sample = _check_on_bad_sample(on_bad_sample)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        try:
            image = decode_image(self.samples[index].image)
        except BadSampleError as error:
            if self.on_bad_sample == "error":
                raise
            try:
                w, h = pseudo_label_size(self.samples[index], self.resize)
            except BadSampleError:
                w, h = 1, 1
            return {"image": torch.zeros(3, h, w, dtype=torch.uint8), "index": torch.tensor(index),
                    "skipped": torch.tensor(1), "skipped_files": skip_record(error)}
        image = np.asarray(image.resize(short_side_size(image.size, self.resize), Image.BILINEAR))
        out = {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "index": torch.tensor(index)}
        if self.on_bad_sample == "skip":
            out["skipped"], out["skipped_files"] = torch.tensor(0), ""
        return out
