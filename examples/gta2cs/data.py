r"""GTA5 and Cityscapes readers, transforms and a resumable, shardable batch stream.

On-disk layouts (the datasets' own, see the protocl method spec §4):

* GTA5: ``<root>/images/*.png`` and ``<root>/labels/*.png`` (same file names; Cityscapes label ids).
* Cityscapes: ``<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` and
  ``<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png``.

Label ids are mapped to the 19 train ids (everything else -> 255). Training samples go through: resize of
the short side, random scale, random crop (padding with ignore when needed), horizontal flip. Every random
choice of a sample comes from a seed handed out by :class:`BatchStream` with its index, so a batch depends
only on (seed, stream, epoch, position): the same whatever the number of workers, and reproducible after a
resume. Images stay uint8 RGB; the model subtracts the mean (see :mod:`model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler

IGNORE = 255
NUM_CLASSES = 19
CLASS_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# Cityscapes label id -> train id (spec §4); everything else is ignored.
ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                  26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def id_to_train_id_lut() -> np.ndarray:
    """A (256,) uint8 lookup table from Cityscapes label ids to train ids (255 elsewhere)."""
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for label_id, train_id in ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


_LUT = id_to_train_id_lut()


@dataclass(frozen=True)
class Sample:
    """One image file, its label file (or None) and a unique name (used for pseudo-label files)."""

    image: Path
    label: Path | None
    name: str


def gta5_files(root: str | Path) -> list[Sample]:
    """List GTA5 samples under ``root``; ``ValueError`` naming the path and the layout if there are none."""
    root = Path(root)
    layout = "<root>/images/*.png with <root>/labels/*.png of the same names"
    if not root.is_dir():
        raise ValueError(f"expected --gta5-root to be a directory in the GTA5 layout ({layout}), got {str(root)!r}")
    images = sorted((root / "images").glob("*.png"))
    if not images:
        raise ValueError(f"expected PNG images in {str(root / 'images')!r} (GTA5 layout: {layout}), found none")
    samples = []
    for image in images:
        label = root / "labels" / image.name
        if not label.is_file():
            raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} (GTA5 layout: {layout})")
        samples.append(Sample(image, label, image.stem))
    return samples


def cityscapes_files(root: str | Path, split: str, *, require_labels: bool = True) -> list[Sample]:
    """List Cityscapes samples of ``split``; ``ValueError`` naming the path and the layout if there are none."""
    root = Path(root)
    layout = ("<root>/leftImg8bit/{train,val}/<city>/*_leftImg8bit.png and "
              "<root>/gtFine/{train,val}/<city>/*_gtFine_labelIds.png")
    if not root.is_dir():
        raise ValueError(
            f"expected --cityscapes-root to be a directory in the Cityscapes layout ({layout}), got {str(root)!r}"
        )
    image_dir = root / "leftImg8bit" / split
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise ValueError(f"expected images in {str(image_dir)!r} (Cityscapes layout: {layout}), found none")
    samples = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / split / image.parent.name / f"{stem}_gtFine_labelIds.png"
        if not label.is_file():
            if require_labels:
                raise ValueError(f"expected the label {str(label)!r} for {str(image)!r} (Cityscapes layout: {layout})")
            label = None
        samples.append(Sample(image, label, stem))
    return samples


def read_image(path: Path) -> Image.Image:
    return Image.open(path).convert("RGB")


def read_label(path: Path, size: tuple[int, int]) -> np.ndarray:
    """Read a label-id PNG, map it to train ids, nearest-resize to ``size`` = (W, H) when it differs."""
    label = Image.open(path)
    if label.mode not in ("L", "P", "I", "I;16"):
        label = label.convert("L")
    if label.size != size:  # a few GTA5 labels differ in size from their image
        label = label.resize(size, Image.NEAREST)
    return _LUT[np.asarray(label).astype(np.int64).clip(0, 255)]


def short_side_size(size: tuple[int, int], short: int) -> tuple[int, int]:
    """(W, H) with the short side resized to ``short`` (aspect kept)."""
    w, h = size
    scale = short / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_pair(image: Image.Image, labels: list[Image.Image], size: tuple[int, int]):
    return image.resize(size, Image.BILINEAR), [lab.resize(size, Image.NEAREST) for lab in labels]


class TrainSet(Dataset):
    r"""Training crops: ``dataset[(index, seed)]`` -> dict of ``image`` uint8 (3, c, c), ``label`` int64 (c, c)
    and, when ``pseudo_dir`` is set, ``static`` int64 (c, c) read from ``<pseudo_dir>/<name>.png``.

    ``label`` is the ground truth (for the target set: used only for a logged precision diagnostic).
    Static pseudo labels are stored at the short-side-resized resolution (see :func:`pseudo_label_size`).
    """

    def __init__(self, samples: Sequence[Sample], *, resize: int, crop: int, scales: Sequence[float] = (1.0,),
                 flip: bool = True, pseudo_dir: str | Path | None = None) -> None:
        self.samples = list(samples)
        self.resize, self.crop, self.scales, self.flip = resize, crop, tuple(scales), flip
        self.pseudo_dir = None if pseudo_dir is None else Path(pseudo_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = item
        rng = np.random.default_rng(seed)
        sample = self.samples[index]
        image = read_image(sample.image)
        size = short_side_size(image.size, self.resize)
        gt = Image.fromarray(read_label(sample.label, image.size)) if sample.label else Image.new("L", image.size, IGNORE)
        image, (gt,) = resize_pair(image, [gt], size)
        labels = [gt]
        if self.pseudo_dir is not None:
            static = Image.open(self.pseudo_dir / f"{sample.name}.png")
            if static.size != size:
                raise ValueError(f"expected static labels of size {size} in {self.pseudo_dir}, got {static.size}")
            labels.append(static)
        scale = float(rng.choice(self.scales))
        scaled = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        image, labels = resize_pair(image, labels, scaled)
        arrays = [np.asarray(image)] + [np.asarray(lab) for lab in labels]
        arrays = random_crop(arrays, self.crop, rng)
        if self.flip and rng.random() < 0.5:
            arrays = [a[:, ::-1] for a in arrays]
        out = {"image": torch.from_numpy(np.ascontiguousarray(arrays[0].transpose(2, 0, 1))),
               "label": torch.from_numpy(arrays[1].astype(np.int64)), "index": torch.tensor(index)}
        if self.pseudo_dir is not None:
            out["static"] = torch.from_numpy(arrays[2].astype(np.int64))
        return out


def random_crop(arrays: list[np.ndarray], crop: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Crop the same random crop×crop window from every array; pad (image 0, labels ignore) when smaller."""
    h, w = arrays[0].shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph or pw:
        arrays = [np.pad(a, ((0, ph), (0, pw)) + ((0, 0),) * (a.ndim - 2), constant_values=0 if i == 0 else IGNORE)
                  for i, a in enumerate(arrays)]
        h, w = arrays[0].shape[:2]
    top = int(rng.integers(0, h - crop + 1))
    left = int(rng.integers(0, w - crop + 1))
    return [a[top:top + crop, left:left + crop] for a in arrays]


class EvalSet(Dataset):
    """Evaluation: image resized to ``size`` = (W, H), train-id label at its full resolution."""

    def __init__(self, samples: Sequence[Sample], *, size: tuple[int, int]) -> None:
        self.samples, self.size = list(samples), tuple(size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image = read_image(sample.image)
        label = read_label(sample.label, image.size)
        image = np.asarray(image.resize(self.size, Image.BILINEAR))
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(label.astype(np.int64)), "index": torch.tensor(index)}


def pseudo_label_size(sample: Sample, short: int) -> tuple[int, int]:
    with Image.open(sample.image) as image:
        return short_side_size(image.size, short)


class PseudoLabelSet(Dataset):
    """Target train images resized on the short side (no augmentation), for static pseudo labels."""

    def __init__(self, samples: Sequence[Sample], *, resize: int) -> None:
        self.samples, self.resize = list(samples), resize

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = read_image(self.samples[index].image)
        image = np.asarray(image.resize(short_side_size(image.size, self.resize), Image.BILINEAR))
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), "index": torch.tensor(index)}


def sample_seed(seed: int, stream: int, epoch: int, position: int) -> int:
    """The augmentation seed of one sample, a pure function of its place in the stream."""
    return int(np.random.SeedSequence([seed, stream, epoch, position]).generate_state(1)[0])


def epoch_batches(n: int, batch_size: int, *, seed: int, stream: int, epoch: int, rank: int, world: int
                  ) -> list[list[tuple[int, int]]]:
    """This rank's batches of one epoch: ``DistributedSampler`` order (seeded by seed + epoch), full batches only."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed * 1000 + stream)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    batches = []
    for b in range(len(indices) // batch_size):
        chunk = indices[b * batch_size:(b + 1) * batch_size]
        batches.append([(i, sample_seed(seed, stream, epoch, (b * batch_size + j) * world + rank))
                        for j, i in enumerate(chunk)])
    return batches


class BatchStream:
    r"""An endless, resumable stream of training batches over epochs.

    The state is ``(epoch, position)`` in consumed batches; :meth:`state_dict` / :meth:`load_state_dict`
    restore it exactly (prefetched batches are simply produced again). Sharded like ``DistributedSampler``
    when ``world > 1``.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, stream: int, rank: int = 0, world: int = 1,
                 workers: int = 0) -> None:
        if len(dataset) < batch_size * world:
            raise ValueError(
                f"expected at least batch_size x world_size = {batch_size * world} images, got {len(dataset)}"
            )
        self.dataset, self.batch_size, self.seed, self.stream = dataset, batch_size, seed, stream
        self.rank, self.world, self.workers = rank, world, workers
        self.epoch, self.position = 0, 0
        self._iter = None

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.restart()

    def restart(self) -> None:
        """Drop prefetched batches (e.g. after ``dataset.pseudo_dir`` changed); continue at the same position."""
        self._iter = None

    def _open(self) -> None:
        batches = epoch_batches(len(self.dataset), self.batch_size, seed=self.seed, stream=self.stream,
                                epoch=self.epoch, rank=self.rank, world=self.world)
        if self.position >= len(batches):
            self.epoch, self.position = self.epoch + 1, 0
            return self._open()
        loader = DataLoader(self.dataset, batch_sampler=batches[self.position:], num_workers=self.workers,
                            persistent_workers=False)
        self._iter = iter(loader)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._open()
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.position, self._iter = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        return batch

    def __iter__(self):
        return self
