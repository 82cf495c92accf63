"""The study's tooling (benchmarks/study: the real-photo shifts, the dynamic-label gates, its use of the
pipeline's diagnostics), and --source-checkpoint."""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import train_gta2cs
from examples_helpers import build
from protocl import IGNORE_INDEX
from uda import diagnostics
from uda.classes import CITYSCAPES
from uda.datasets import cityscapes_files, gta5_files
from uda.labels import read_label
from uda.loading import EvalSet, TrainSet
from PIL import Image

from benchmarks.study import adaptation_study, gates, shifts

TINY = {"source_images": 4, "target_train": 4, "target_val": 2, "size": (48, 24)}
TINY_RUN = ["--source-iters", "4", "--rounds", "1", "--round-iters", "3", "--batch-size", "2", "--crop", "16",
            "--resize", "24", "--eval-size", "48x24", "--log-every", "1", "--ckpt-every", "2", "--workers", "0",
            "--threads", "1", "--arch", "tiny"]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module", params=shifts.SHIFTS)
def shift_roots(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    return request.param, shifts.write_shift(request.param, root, seed=5, **TINY)


def test_images_are_read_from_the_installed_wheel():
    folder = shifts.skimage_data_dir()
    names = {name for name, _, _ in shifts.GRAY_TEXTURES.values()}
    names |= {name for name, _ in shifts.PHOTO_CROPS.values()} | set(shifts.CLUTTER_PHOTOS)
    for name in names:
        assert (folder / name).is_file(), name
        image = shifts._image(name)
        assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 5  # a real, non-constant picture


def test_shift_reads_back_through_the_pipeline_readers(shift_roots):
    shift, (gta, cs) = shift_roots
    source = gta5_files(gta)
    train = cityscapes_files(cs, "train")
    val = cityscapes_files(cs, "val")
    assert (len(source), len(train), len(val)) == (4, 4, 2)
    allowed = set(shifts.SHAPE_CLASSES if shift == "shape" else shifts.SHIFT_CLASSES) | {IGNORE_INDEX}
    seen = set()
    for sample in source + train + val:
        with Image.open(sample.image) as image:
            assert image.size == (48, 24) and image.mode == "RGB"
        labels = read_label(sample.label, (48, 24))
        assert set(np.unique(labels)) <= allowed
        seen |= set(np.unique(labels).tolist())
    assert ({shifts.GROUND, shifts.STROKE} if shift == "shape" else {shifts.ROAD, shifts.SKY, shifts.BUILDING}) <= seen
    crop = TrainSet(train, resize=24, crop=16)[(0, 7)]
    assert crop["image"].shape == (3, 16, 16) and crop["label"].shape == (16, 16)
    item = EvalSet(val, size=(48, 24))[0]
    assert item["image"].shape == (3, 24, 48) and item["label"].shape == (24, 48)


def test_shift_is_deterministic_and_seeded(shift_roots, tmp_path):
    shift, (gta, _) = shift_roots
    root = gta.parent
    again = shifts.write_shift(shift, tmp_path / "again", seed=5, **TINY)
    assert _digest(root) == _digest(again[0].parent)
    other = shifts.write_shift(shift, tmp_path / "other", seed=6, **TINY)
    assert _digest(root) != _digest(other[0].parent)


def _texture_std(samples, cls: int) -> float:
    """Mean over images of the within-image colour spread of one class's pixels (its texture)."""
    spreads = []
    for sample in samples:
        image = np.asarray(Image.open(sample.image).convert("RGB"), np.float64)
        labels = read_label(sample.label, image.shape[1::-1])
        inner = labels == cls
        inner[1:] &= labels[:-1] == cls  # skip the outline pixels of the cartoon rendering
        inner[:, 1:] &= labels[:, :-1] == cls
        if inner.sum() > 20:
            spreads.append(image[inner].std(0).mean())
    return float(np.mean(spreads))


def test_the_two_shifts_differ_in_kind(tmp_path):
    kw = {"source_images": 8, "target_train": 8, "target_val": 1, "size": (64, 32)}
    photo_gta, photo_cs = shifts.write_shift("photo", tmp_path / "photo", seed=0, **kw)
    clutter_gta, clutter_cs = shifts.write_shift("clutter", tmp_path / "clutter", seed=0, **kw)
    # photo: the source road is flat (cartoon), the target road is a real gravel texture
    src_road = _texture_std(gta5_files(photo_gta), shifts.ROAD)
    assert _texture_std(cityscapes_files(photo_cs, "train"), shifts.ROAD) > 3 * src_road
    # clutter: the source is already textured; the target has unlabelled photo occluders, the source none
    clutter_src = [read_label(s.label, (64, 32)) for s in gta5_files(clutter_gta)]
    clutter_tgt = [read_label(s.label, (64, 32)) for s in cityscapes_files(clutter_cs, "train")]
    assert _texture_std(gta5_files(clutter_gta), shifts.ROAD) > 3 * src_road
    assert all((lab == IGNORE_INDEX).mean() == 0 for lab in clutter_src)
    assert all((lab == IGNORE_INDEX).mean() > 0.02 for lab in clutter_tgt)


def test_bad_arguments():
    with pytest.raises(ValueError, match="expected shift in"):
        shifts.write_shift("fog", "/nonexistent")
    with pytest.raises(ValueError, match="expected size"):
        shifts.write_shift("photo", "/nonexistent", size=(8, 8))


def test_cli_writes_a_shift(tmp_path, capsys):
    assert shifts.main(["clutter", str(tmp_path), "--source-images", "2", "--target-train", "2", "--target-val",
                        "1", "--width", "32", "--height", "16"]) == 0
    assert "--gta5-root" in capsys.readouterr().out
    assert len(cityscapes_files(tmp_path / "cityscapes", "val")) == 1


# ---------------------------------------------------------------------------------------------- --source-checkpoint
@pytest.fixture(scope="module")
def photo_tiny(tmp_path_factory):
    return shifts.write_shift("photo", tmp_path_factory.mktemp("photo_tiny"), seed=1, **TINY)


def test_source_checkpoint_skips_stage_one(photo_tiny, tmp_path, capsys):
    gta, cs = photo_tiny
    roots = ["--gta5-root", str(gta), "--cityscapes-root", str(cs)]
    assert train_gta2cs.main([*roots, *TINY_RUN, "--out", str(tmp_path / "a"), "--no-control"]) == 0
    source = tmp_path / "a" / "source_only.pt"
    out = tmp_path / "b"
    assert train_gta2cs.main([*roots, *TINY_RUN, "--out", str(out), "--control", "--source-checkpoint",
                              str(source)]) == 0
    log = (out / "log.txt").read_text()
    assert "stage 1 it" not in log and "stage 1 skipped" in log and "control round 0" in log
    first = json.loads((tmp_path / "a" / "metrics.json").read_text())
    second = json.loads((out / "metrics.json").read_text())
    assert second["source_only"] == first["source_only"]  # the same weights, evaluated on the same split
    loaded = torch.load(source, weights_only=False)["model"]
    copied = torch.load(out / "source_only.pt", weights_only=False)["model"]
    assert loaded.keys() == copied.keys()
    for k in loaded:  # tensors, and the model's extra state (a dict)
        assert torch.equal(loaded[k], copied[k]) if torch.is_tensor(loaded[k]) else loaded[k] == copied[k]
    assert "adapted" in second and "source_only_continued" in second


def test_source_checkpoint_errors(photo_tiny, tmp_path, capsys):
    gta, cs = photo_tiny
    roots = ["--gta5-root", str(gta), "--cityscapes-root", str(cs)]
    code = train_gta2cs.main([*roots, *TINY_RUN, "--out", str(tmp_path), "--source-checkpoint",
                              str(tmp_path / "missing.pt")])
    assert code == 2 and "expected --source-checkpoint to be a checkpoint file" in capsys.readouterr().err
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    code = train_gta2cs.main([*roots, *TINY_RUN, "--out", str(tmp_path), "--source-checkpoint",
                              str(tmp_path / "other.pt")])
    assert code == 2 and "to match --arch tiny" in capsys.readouterr().err
    torch.save([1, 2], tmp_path / "list.pt")
    code = train_gta2cs.main([*roots, *TINY_RUN, "--out", str(tmp_path), "--source-checkpoint",
                              str(tmp_path / "list.pt")])
    assert code == 2 and "to hold {'model': state_dict}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- study diagnostics
def test_one_class_mean_rule_for_pipeline_and_study(tmp_path):
    """The study's static-label diagnostics are the pipeline's (uda.diagnostics): undefined classes are NaN and
    left out of the class means, a spurious class has precision 0, a mean over no defined class is NaN."""
    k = 19
    rng = np.random.default_rng(0)
    gt = rng.choice([0, 2, 5, 13, 255], size=(1, 20, 25))
    labels = np.where(rng.random(gt.shape) < 0.3, 255, np.where(rng.random(gt.shape) < 0.7, gt,
                                                                rng.choice([0, 2, 8], gt.shape)))
    got = diagnostics.summarize(diagnostics.class_counts(torch.from_numpy(labels), torch.from_numpy(gt), k))
    known = gt != 255
    for c in (0, 2, 5, 13):
        assert got["coverage"][c] == pytest.approx(100 * (labels[known & (gt == c)] != 255).mean())
    for c in (0, 2, 8):
        assert got["precision"][c] == pytest.approx(100 * (gt[known & (labels == c)] == c).mean())
    assert math.isnan(got["coverage"][8]) and got["precision"][8] == 0  # labelled 8, never 8 in the ground truth
    defined = [c for c in range(k) if not math.isnan(got["precision"][c])]
    assert got["class_mean_precision"] == pytest.approx(np.mean([got["precision"][c] for c in defined]))
    assert got["class_mean_coverage"] == pytest.approx(np.mean([got["coverage"][c] for c in (0, 2, 5, 13)]))
    empty = diagnostics.summarize(diagnostics.class_counts(torch.full((4,), 255), torch.full((4,), 255), k))
    assert math.isnan(empty["class_mean_coverage"]) and math.isnan(empty["class_mean_precision"])
    # the study's per-split counts of written PNGs: the same function
    cs = tmp_path / "cs"
    (cs / "leftImg8bit" / "train" / "c").mkdir(parents=True)
    (cs / "gtFine" / "train" / "c").mkdir(parents=True)
    (tmp_path / "run" / "pseudo_labels" / "round_00").mkdir(parents=True)
    ids = {v: key for key, v in CITYSCAPES.id_to_train_id.items()}
    Image.new("RGB", (25, 20)).save(cs / "leftImg8bit" / "train" / "c" / "c_0_0_leftImg8bit.png")
    Image.fromarray(np.vectorize(lambda t: ids.get(t, 0))(gt[0]).astype(np.uint8)).save(
        cs / "gtFine" / "train" / "c" / "c_0_0_gtFine_labelIds.png")
    Image.fromarray(labels[0].astype(np.uint8)).save(tmp_path / "run" / "pseudo_labels" / "round_00" / "c_0_0.png")
    counts = adaptation_study.static_png_counts(tmp_path / "run", str(cs), 0)
    assert torch.equal(counts, diagnostics.class_counts(torch.from_numpy(labels), torch.from_numpy(gt), k))


# ---------------------------------------------------------------------------------------------- gates
def test_gate_dynamic_keeps_static_and_agreeing_dynamic_labels():
    ig = IGNORE_INDEX
    static = torch.tensor([[0, ig, ig, ig, 2, ig]])
    hybrid = torch.tensor([[0, 1, 3, ig, 2, 4]])  # fill: static where set, dynamic elsewhere
    prediction = torch.tensor([[5, 1, 2, 3, 7, 4]])
    # static labels stay even where the prediction differs; dynamic ones only where the prediction agrees
    assert gates.gate_dynamic(static, hybrid, prediction).tolist() == [[0, 1, ig, ig, 2, 4]]
    loop = [h if (s != ig or h == p) else ig for s, h, p in zip(static[0].tolist(), hybrid[0].tolist(),
                                                                   prediction[0].tolist())]
    assert gates.gate_dynamic(static, hybrid, prediction)[0].tolist() == loop


@pytest.mark.parametrize("gate", gates.RULES[:3])  # issue 11's gates; issue 20's: tests/test_signals.py
def test_gate_hook_trains_the_target_ce_on_gated_labels(photo_tiny, tmp_path, gate):
    """The study's gate through adapt_step's target_labels hook: the CE's labels are the gated ones, FCL/BCL the
    orchestrator's; the run finishes."""
    gta, cs = photo_tiny
    run = build(["--gta5-root", str(gta), "--cityscapes-root", str(cs), *TINY_RUN, "--out", str(tmp_path),
                 "--no-control"])
    state = train_gta2cs.start(run)
    seen = []
    hook = gates.target_labels_hook(gate, 19)

    def recording(out, static, logits, sims):
        labels = hook(out, static, logits, sims)
        seen.append((out.target_labels.clone(), labels.clone()))
        return labels

    train_gta2cs.train(run, state, step=functools.partial(train_gta2cs.adapt_step, target_labels=recording))
    train_gta2cs.finish(run, state)
    protocl_metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "adapted" in protocl_metrics and len(seen) == 3
    for hybrid, used in seen:  # gated labels are the hybrid labels or ignore
        assert bool(((used == hybrid) | (used == IGNORE_INDEX)).all())
    with pytest.raises(ValueError, match="expected rule in"):
        gates.target_labels_hook("none", 19)


def _agreement_loop(static, dynamic, hybrid, k, min_agreement=0.5, prediction=None):
    ig = IGNORE_INDEX
    overlap, agree = [0] * k, [0] * k
    for s, d in zip(static, dynamic):
        if s != ig and d != ig:
            overlap[d] += 1
            agree[d] += s == d
    prediction = prediction if prediction is not None else [None] * len(static)
    return [h if s != ig or (d != ig and agree[d] >= min_agreement * overlap[d]) or h == p else ig
            for s, d, h, p in zip(static, dynamic, hybrid, prediction)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("either", [False, True])
def test_gate_by_agreement_against_a_loop(seed, either):
    ig, k = IGNORE_INDEX, 5
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, k, (2, 9, 7), generator=g)
    # static labels: sparse and mostly right; dynamic labels: dense, class 1 mostly wrong
    static = torch.where(torch.rand(truth.shape, generator=g) < 0.4, truth, ig)
    noise = torch.randint(0, k, truth.shape, generator=g)
    dynamic = torch.where(torch.rand(truth.shape, generator=g) < 0.6, truth, noise)
    dynamic = torch.where(truth == 1, (truth + 1) % k, dynamic)
    dynamic = torch.where(torch.rand(truth.shape, generator=g) < 0.2, ig, dynamic)
    hybrid = torch.where(static != ig, static, dynamic)
    prediction = torch.randint(0, k, truth.shape, generator=g) if either else None
    got = gates.gate_by_agreement(static, dynamic, hybrid, k, prediction=prediction)
    assert got.flatten().tolist() == _agreement_loop(
        static.flatten().tolist(), dynamic.flatten().tolist(), hybrid.flatten().tolist(), k,
        prediction=prediction.flatten().tolist() if either else None)
    assert torch.equal(got[static != ig], static[static != ig])  # static labels always stay


def test_gate_by_agreement_drops_a_class_that_disagrees():
    ig = IGNORE_INDEX
    static = torch.tensor([[0, 0, 0, 2, ig, ig, ig, ig]])
    dynamic = torch.tensor([[1, 1, 0, 2, 1, 0, 2, 3]])  # dynamic 1 meets static twice, never agrees
    hybrid = torch.where(static != ig, static, dynamic)
    # class 1 dropped; 0 and 2 agree; 3 never meets a static label: kept (no evidence against it)
    assert gates.gate_by_agreement(static, dynamic, hybrid, 4).tolist() == [[0, 0, 0, 2, ig, 0, 2, 3]]
