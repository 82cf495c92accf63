r"""Predictions of a trained checkpoint on a folder or a dataset split, in the evaluation servers' formats.

For each image it writes (``<out>/<kind>/<file>.png``, ``<file>`` = the image's file name with ``.png``):

* ``trainids/`` — uint8 train ids ``0..K-1`` (what the ACDC and Dark Zurich servers score);
* ``labelids/`` — the class table's output ids: for Cityscapes the label ids (7 road, 8 sidewalk, ..., 33
  bicycle) that the Cityscapes evaluation server expects; for a custom table each class's first raw id;
* ``colour/`` — the class colours; ``overlay/`` — the colours blended 50 % over the image.

The rule is the evaluation's (:func:`evaluate.evaluate`): the image is resized to ``eval_size`` (W, H,
bilinear, as :class:`loading.EvalSet` does), the logits are bilinearly upsampled to the image's full size
(``align_corners=False``) and the argmax is taken there. With ``flip=True`` the softmax probabilities of the
image and of its horizontal mirror (flipped back) are averaged first. On a labelled split the confusion matrix
against the ground truth gives the same IoU table as the training run's evaluation
(:func:`evaluate.summarize`), and :func:`score_predictions` scores written ``trainids/`` files the same way.

Checkpoints are read with ``torch.load(weights_only=True)`` (:func:`checkpoint.load`): ``source_only.pt``,
``adapted.pt`` and ``checkpoint.pt`` of a run (``{"model": state_dict, "config": ..., "classes": ...}``), a bare
state dict, or a peer's AdaptSegNet/DASS ``Res_Deeplab`` / ``DeeplabMulti`` state dict (with
``peer_classifier``, see :mod:`uda.weights`). The network is the one the file needs
(:func:`weights.build_model_for`): a run's checkpoint carries its description (architecture, ResNet depth,
stride placement, channel order, mean/std, features, K); an older one's is read from its keys, shapes and
``bgr`` flag. The class table is ``--class-table``, else the checkpoint's ``classes`` entry, else
Cityscapes-19 when K = 19. The command is ``examples/predict.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from . import checkpoint, datasets, labels
from .classes import CITYSCAPES, SYNTHIA_SUBSETS, ClassTable, load_table
from .datasets import Sample
from .evaluate import confusion_matrix, iou_table, summarize
from .labels import decode_image
from .options import parse_size
from .weights import PEER_CLASSIFIERS, build_model_for

KINDS = ("trainids", "labelids", "colour", "overlay")
DATASETS = ("cityscapes", "acdc", "darkzurich", "folder")


# ---------------------------------------------------------------------------------------------------- model
def load_model(path: str | Path, *, peer_classifier: str | None = None, log=None) -> tuple[nn.Module, dict]:
    """``(model, config)`` from a checkpoint file; ``config`` is the run's options (``{}`` if absent) with the run's
    class table under ``classes`` when recorded. The network is the one the file needs
    (:func:`weights.build_model_for`); ``log`` gets the line saying what was detected and loaded."""
    ckpt = checkpoint.load(path, "--checkpoint")
    model, message = build_model_for(ckpt, option=f"--checkpoint {str(path)!r}", peer_classifier=peer_classifier)
    if log:
        log(message)
    config = dict(ckpt.get("config")) if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), dict) else {}
    if isinstance(ckpt, dict) and isinstance(ckpt.get("classes"), dict):  # the run's class table, when recorded
        config["classes"] = ckpt["classes"]
    return model.eval(), config


# ----------------------------------------------------------------------------------------------- predicting
@torch.no_grad()
def probabilities(model: nn.Module, image: Image.Image, eval_size: tuple[int, int], *, flip: bool = False,
                  device: torch.device | str = "cpu") -> Tensor:
    """(K, H, W) float32 scores at the image's full size: logits (``flip=False``) or the flip-averaged softmax.

    The image is resized to ``eval_size`` = (W, H) exactly as :class:`loading.EvalSet` resizes it.
    """
    full = image.size[::-1]
    small = np.asarray(image.resize(tuple(eval_size), Image.BILINEAR))
    x = torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1)))[None].to(device)
    batch = torch.cat([x, x.flip(-1)]) if flip else x
    logits, _ = model(batch)
    logits = F.interpolate(logits.float(), size=full, mode="bilinear", align_corners=False)
    if not flip:
        return logits[0]
    probs = logits.softmax(1)
    return 0.5 * (probs[0] + probs[1].flip(-1))


def predict(model: nn.Module, image: Image.Image, eval_size: tuple[int, int], *, flip: bool = False,
            device: torch.device | str = "cpu") -> np.ndarray:
    """(H, W) uint8 train ids at the image's full size."""
    return probabilities(model, image, eval_size, flip=flip, device=device).argmax(0).to(torch.uint8).cpu().numpy()


def overlay(image: np.ndarray, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    return (alpha * colours.astype(np.float32) + (1 - alpha) * image.astype(np.float32)).round().astype(np.uint8)


def output_names(samples: Sequence[Sample]) -> list[str]:
    """The PNG file name of each sample's predictions: the image's file name with ``.png`` (as the servers'
    tools name them), or the sample's unique name when two images share a file name."""
    names = [Path(s.image).stem + ".png" for s in samples]
    if len(set(names)) < len(names):
        names = [s.name + ".png" for s in samples]
    return names


def write_prediction(pred: np.ndarray, image: np.ndarray, file: str, out: str | Path, table: ClassTable,
                     kinds: Sequence[str] = KINDS) -> None:
    out = Path(out)
    colours = table.colorize(pred) if {"colour", "overlay"} & set(kinds) else None
    arrays = {"trainids": lambda: pred, "labelids": lambda: table.to_output_ids(pred), "colour": lambda: colours,
              "overlay": lambda: overlay(image, colours)}
    for kind in kinds:
        (out / kind).mkdir(parents=True, exist_ok=True)
        Image.fromarray(arrays[kind]()).save(out / kind / file)


def predict_samples(model: nn.Module, samples: Sequence[Sample], out: str | Path | None, *, table: ClassTable,
                    eval_size: tuple[int, int], flip: bool = False, device: torch.device | str = "cpu",
                    kinds: Sequence[str] = KINDS, subsets: dict | None = None, log=print) -> dict | None:
    """Predict every sample, write ``kinds`` under ``out`` (``None``: write nothing) and, when every sample has a
    label, return :func:`evaluate.summarize` of the confusion matrix (else ``None``)."""
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"expected output kinds among {KINDS}, got {bad}")
    if model.num_classes != table.num_classes:
        raise ValueError(f"expected a class table with the model's K={model.num_classes} classes, got "
                         f"{table.name!r} with K={table.num_classes}")
    model = model.to(device).eval()
    labelled = bool(samples) and all(s.label is not None for s in samples)
    k = table.num_classes
    confusion = torch.zeros(k, k, dtype=torch.int64)
    for i, (sample, file) in enumerate(zip(samples, output_names(samples))):
        image = decode_image(sample.image)
        pred = predict(model, image, eval_size, flip=flip, device=device)
        if out is not None:
            write_prediction(pred, np.asarray(image), file, out, table, kinds)
        if labelled:
            label = labels.read_sample_label(sample, image.size)
            confusion += confusion_matrix(torch.from_numpy(pred).long(), torch.from_numpy(label).long(), k)
        if log and ((i + 1) % 50 == 0 or i + 1 == len(samples)):
            log(f"predicted {i + 1}/{len(samples)} images")
    return summarize(confusion, subsets) | {"confusion": confusion.tolist()} if labelled else None


def score_predictions(pred_dir: str | Path, samples: Sequence[Sample], num_classes: int, *,
                      subsets: dict | None = None) -> dict:
    """Score written train-id PNGs (``<pred_dir>/<file>``, names as :func:`output_names`) against the samples'
    labels: :func:`evaluate.summarize` of the confusion matrix."""
    pred_dir = Path(pred_dir)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for sample, file in zip(samples, output_names(samples)):
        if sample.label is None:
            raise ValueError(f"expected labelled samples to score, got {str(sample.image)!r} without a label")
        path = pred_dir / file
        if not path.is_file():
            raise ValueError(f"expected the prediction {str(path)!r} for {str(sample.image)!r}, found none")
        pred = np.asarray(Image.open(path))
        with Image.open(sample.image) as image:
            size = image.size
        if pred.shape != size[::-1] or pred.ndim != 2:
            raise ValueError(f"expected a (H, W) = {size[::-1]} train-id map in {str(path)!r}, got {pred.shape}")
        if pred.size and int(pred.max()) >= num_classes:
            raise ValueError(f"expected train ids < K={num_classes} in {str(path)!r}, got {int(pred.max())} "
                             f"(a label-id file? score the trainids/ folder)")
        label = labels.read_sample_label(sample, size)
        confusion += confusion_matrix(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(label).long(),
                                      num_classes)
    return summarize(confusion, subsets) | {"confusion": confusion.tolist()}


# ---------------------------------------------------------------------------------------------------- CLI
def dataset_samples(args: argparse.Namespace, table: ClassTable, *, table_known: bool = False) -> list[Sample]:
    """The samples named by ``--images`` or ``--dataset/--root/--split``; a folder's labels go through ``table``,
    which must be ``--class-table`` or the checkpoint's (``table_known``)."""
    if args.images is not None:
        folder = Path(args.images)
        files = datasets.image_files(folder) if folder.is_dir() else []
        if not files:
            raise ValueError(f"expected --images to be a folder with images ({', '.join(datasets.IMAGE_SUFFIXES)}), "
                             f"got {str(folder)!r}")
        return [Sample(f, None, "__".join(f.relative_to(folder).with_suffix("").parts)) for f in files]
    if args.dataset is None or args.root is None:
        raise ValueError("expected --images DIR, or --dataset with --root (and --split)")
    split = args.split
    if args.dataset == "cityscapes":
        from .datasets import cityscapes_files

        samples = cityscapes_files(args.root, split or "val", require_labels=(split or "val") != "test")
        # the test split's gtFine files are placeholders (no public labels): never scored
        return [replace(s, label=None) for s in samples] if split == "test" else samples
    if args.dataset == "acdc":
        return datasets.acdc_files(args.root, split or "val", args.condition or "all")
    if args.dataset == "darkzurich":
        return datasets.darkzurich_files(args.root, split or "val")
    if args.class_table is None and not table_known:
        raise ValueError("expected --class-table with --dataset folder (the labels' raw ids and classes; the "
                         "checkpoint records none)")
    return datasets.folder_files(args.root, table, split, require_labels=False, option="--root")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Predict a checkpoint on images (train ids, label ids, colours, overlays); on a labelled split "
                    "also print the IoU table. With --score, score written train-id PNGs instead.")
    p.add_argument("--checkpoint", help="source_only.pt, adapted.pt or checkpoint.pt of a run (or a state dict), or "
                                        "a peer's Res_Deeplab / DeeplabMulti state dict (with --peer-classifier)")
    p.add_argument("--peer-classifier", choices=PEER_CLASSIFIERS,
                   help="for a peer's DeepLab-V2 file: which ASPP branches its code summed (all-branches: DASS; "
                        "first-two: AdaptSegNet, whose Classifier_Module returns inside its loop); docs/reproduce.md")
    p.add_argument("--images", help="a folder of images (recursively; no labels)")
    p.add_argument("--dataset", choices=DATASETS, help="a dataset split instead of --images")
    p.add_argument("--root", help="the dataset's root (its released layout, see docs/datasets.md)")
    p.add_argument("--split", help="split (cityscapes: train/val/test, acdc: train/val/test, darkzurich: "
                                   "train/val/test, folder: a subfolder or none); default val")
    p.add_argument("--acdc-conditions", "--condition", nargs="+", dest="condition",
                   choices=datasets.ACDC_CONDITIONS + ("all",), help="ACDC conditions (default all)")
    p.add_argument("--class-table", help="class table: cityscapes, synthia or a JSON file (default: the "
                                         "checkpoint's, else cityscapes when K=19); required for --dataset folder")
    p.add_argument("--out", help="output folder (trainids/, labelids/, colour/, overlay/, metrics.json)")
    p.add_argument("--write", nargs="+", choices=KINDS, default=list(KINDS), help="which outputs to write")
    p.add_argument("--eval-size", type=parse_size, help="network input WIDTHxHEIGHT (default: the checkpoint's "
                                                   "--eval-size)")
    p.add_argument("--flip", action="store_true", help="average the softmax of the image and its mirror")
    p.add_argument("--device", default="cpu")
    p.add_argument("--score", help="score the train-id PNGs in this folder against the split's labels (no "
                                   "checkpoint needed)")
    return p


def _subsets(config: dict) -> dict | None:
    return dict(SYNTHIA_SUBSETS) if config.get("source") == "synthia" else None


def _report(result: dict, table: ClassTable, out: Path | None, extra: dict, log=print) -> None:
    log("per-class IoU (%):\n" + iou_table({"IoU": result["iou"]}, table.names))
    headline = f"mIoU: {result['miou']:.2f}" + "".join(
        f", mIoU{n} {result[f'miou{n}']:.2f}" for n in ("16", "13") if f"miou{n}" in result)
    log(headline)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        clean = {k: ([None if isinstance(v, float) and math.isnan(v) else v for v in val] if isinstance(val, list)
                     and val and isinstance(val[0], float) else val) for k, val in result.items()}
        (out / "metrics.json").write_text(json.dumps({**extra, **clean, "class_names": list(table.names)},
                                                     indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out) if args.out else None
    try:
        if args.score is not None:
            table = load_table(args.class_table)
            samples = dataset_samples(args, table)
            result = score_predictions(args.score, samples, table.num_classes)
            _report(result, table, out, {"scored": str(args.score)})
            return 0
        if args.checkpoint is None or out is None:
            raise ValueError("expected --checkpoint and --out (or --score)")
        model, config = load_model(args.checkpoint, peer_classifier=args.peer_classifier, log=print)
        if args.class_table is not None:
            table = load_table(args.class_table)
        elif isinstance(config.get("classes"), dict):
            table = ClassTable.from_dict(config["classes"], source=f"the class table of {args.checkpoint!r}")
        elif model.num_classes == CITYSCAPES.num_classes:
            table = CITYSCAPES
        else:
            raise ValueError(f"expected --class-table for a checkpoint with K={model.num_classes} classes")
        samples = dataset_samples(args, table, table_known=isinstance(config.get("classes"), dict))
        eval_size = args.eval_size or (tuple(config["eval_size"]) if config.get("eval_size") else None)
        if eval_size is None:
            raise ValueError("expected --eval-size (the checkpoint does not record one)")
        print(f"predicting {len(samples)} images at {eval_size[0]}x{eval_size[1]}{' with flip' if args.flip else ''}"
              f" -> {out}")
        result = predict_samples(model, samples, out, table=table, eval_size=eval_size, flip=args.flip,
                                 device=args.device, kinds=args.write, subsets=_subsets(config))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result is not None:
        _report(result, table, out, {"checkpoint": str(args.checkpoint), "eval_size": list(eval_size),
                                     "flip": args.flip})
    return 0
