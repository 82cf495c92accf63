"""Tests of the reference pipeline examples/train_gta2cs.py on a tiny fixture in the real dataset layouts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import train_gta2cs
from examples_helpers import (
    TINY_RUN,
    assert_same_state,
    crash_after,
    expected_last_line,
    load_checkpoint,
    train_with,
    write_fixture,
)
from uda import evaluate, figures, model, weights
from uda.datasets import cityscapes_files, gta5_files
from uda.demo import write_demo_dataset
from uda.labels import read_label
from uda.loading import TrainSet
from uda.scenes import DEMO_CLASSES
from uda.stream import BatchStream, epoch_batches
from PIL import Image

# spec §4, written out here independently of the code under test
SPEC_ID_TO_TRAIN_ID = [(7, 0), (8, 1), (11, 2), (12, 3), (13, 4), (17, 5), (19, 6), (20, 7), (21, 8), (22, 9),
                       (23, 10), (24, 11), (25, 12), (26, 13), (27, 14), (28, 15), (31, 16), (32, 17), (33, 18)]



@pytest.fixture(scope="module")
def fixture_roots(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dataset in the GTA5 / Cityscapes layouts (the demo generator at a small size)."""
    return write_fixture(tmp_path_factory.mktemp("fixture"))


def run_cli(args: list[str], capsys) -> list[str]:
    code = train_gta2cs.main(args)
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    return lines


@pytest.fixture(scope="module")
def full_run(fixture_roots, tmp_path_factory):
    """One uninterrupted run; records every file it opens with PIL (``opened.txt``)."""
    gta, cs = fixture_roots
    out = tmp_path_factory.mktemp("full")
    opened, real_open = [], Image.open

    def spy(fp, *args, **kwargs):
        opened.append(str(fp))
        return real_open(fp, *args, **kwargs)

    Image.open = spy
    try:
        code = train_gta2cs.main(["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--arch", "tiny",
                                  "--out", str(out), *TINY_RUN])
    finally:
        Image.open = real_open
    assert code == 0
    (out / "opened.txt").write_text("\n".join(opened))
    return out


# ---------------------------------------------------------------------------------------------- data
def test_label_ids_map_to_train_ids(tmp_path):
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(ids).save(tmp_path / "l.png")
    got = read_label(tmp_path / "l.png", (16, 16)).reshape(-1)
    expected = np.full(256, 255)
    for label_id, train_id in SPEC_ID_TO_TRAIN_ID:
        expected[label_id] = train_id
    np.testing.assert_array_equal(got, expected)


def test_palette_mode_label_and_size_mismatch(tmp_path):
    """GTA5 labels are palette PNGs, a few of another size than their image: indices are ids, resized nearest."""
    label = Image.fromarray(np.array([[7, 26], [24, 0]], dtype=np.uint8), mode="L").convert("P")
    label.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    label.save(tmp_path / "p.png")
    got = read_label(tmp_path / "p.png", (4, 4))
    np.testing.assert_array_equal(got, [[0, 0, 13, 13], [0, 0, 13, 13], [11, 11, 255, 255], [11, 11, 255, 255]])


def test_missing_or_empty_roots_name_path_and_layout(tmp_path):
    with pytest.raises(ValueError, match=r"gta5-root.*images/\*\.png.*nowhere"):
        gta5_files(tmp_path / "nowhere")
    (tmp_path / "gta").mkdir()
    with pytest.raises(ValueError, match=r"images.*GTA5 layout"):
        gta5_files(tmp_path / "gta")
    with pytest.raises(ValueError, match=r"cityscapes-root.*leftImg8bit"):
        cityscapes_files(tmp_path / "nowhere", "train")
    (tmp_path / "cs" / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    Image.new("RGB", (4, 2)).save(tmp_path / "cs" / "leftImg8bit" / "val" / "x" / "x_0_0_leftImg8bit.png")
    with pytest.raises(ValueError, match=r"gtFine_labelIds\.png"):
        cityscapes_files(tmp_path / "cs", "val")
    assert cityscapes_files(tmp_path / "cs", "val", require_labels=False)[0].label is None


def test_cli_reports_a_missing_root_without_traceback(fixture_roots, tmp_path, capsys):
    _, cs = fixture_roots
    code = train_gta2cs.main(["--gta5-root", str(tmp_path / "nowhere"), "--cityscapes-root", str(cs), "--arch", "tiny",
                              "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: expected --gta5-root") and str(tmp_path / "nowhere") in err


def test_train_crops_are_deterministic_and_aligned(fixture_roots):
    gta, _ = fixture_roots
    samples = gta5_files(gta)
    ds = TrainSet(samples, resize=40, crop=24, scales=(0.8, 1.0, 1.2))
    a, b = ds[(1, 123)], ds[(1, 123)]
    assert a["image"].shape == (3, 24, 24) and a["image"].dtype == torch.uint8
    assert a["label"].shape == (24, 24) and a["label"].dtype == torch.uint8  # widened to int64 on the device
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    # the crop window of image and label agree: sky (10) pixels are the bluest in the flat source rendering
    sky = a["label"] == 10
    if sky.any() and (~sky & (a["label"] != 255)).any():
        blue = a["image"][2].float() - a["image"][0].float()
        assert blue[sky].mean() > blue[~sky & (a["label"] != 255)].mean()


def test_batch_stream_resumes_and_ignores_worker_count(fixture_roots):
    gta, _ = fixture_roots
    ds = TrainSet(gta5_files(gta), resize=32, crop=16)
    ref = BatchStream(ds, 2, seed=5, stream=0, workers=0)
    batches = [next(ref)["image"] for _ in range(7)]  # crosses an epoch boundary (3 batches per epoch)
    other = BatchStream(ds, 2, seed=5, stream=0, workers=2)
    assert all(torch.equal(next(other)["image"], x) for x in batches[:4])
    resumed = BatchStream(ds, 2, seed=5, stream=0, workers=0)
    resumed.load_state_dict(other.state_dict())
    assert all(torch.equal(next(resumed)["image"], x) for x in batches[4:])


def test_shards_partition_each_epoch():
    full = [i for b in epoch_batches(12, 2, seed=1, stream=0, epoch=3, rank=0, world=1) for i, _ in b]
    parts = [i for r in range(2) for b in epoch_batches(12, 2, seed=1, stream=0, epoch=3, rank=r, world=2)
             for i, _ in b]
    assert sorted(full) == sorted(parts) == list(range(12))
    other_epoch = [i for b in epoch_batches(12, 2, seed=1, stream=0, epoch=4, rank=0, world=1) for i, _ in b]
    assert other_epoch != full


# ---------------------------------------------------------------------------------------------- model
def test_deeplab_v2_resnet101_shapes_and_frozen_bn():
    net = model.DeepLabV2(19).eval()
    n_conv = sum(1 for m in net.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert n_conv == 104  # ResNet-101: 1 stem + 33 blocks x 3 + 4 downsample convs
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert all(not n.startswith("backbone") or "bn" not in n for n, _ in net.named_parameters())
    with torch.no_grad():
        logits, features = net(torch.rand(1, 3, 64, 96) * 255)
    # output stride 8 with DeepLab's ceil-mode max-pool: 64 -> 32 -> 17 -> 9 (730 -> 365 -> 184 -> 92)
    assert logits.shape == (1, 19, 9, 13) and features.shape == (1, 76, 9, 13)
    assert torch.allclose(sum(features.split(19, dim=1)), logits, atol=1e-5)  # branches summed = logits
    dilations = [c.dilation[0] for c in net.classifier.branches]
    assert dilations == [6, 12, 18, 24]


def test_deeplab_layer4_projection_option():
    net = model.DeepLabV2(5, features="layer4", proj_dim=32, blocks=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        logits, features = net(torch.rand(2, 3, 40, 40) * 255)
    assert logits.shape == (2, 5, 6, 6) and features.shape == (2, 32, 6, 6) and net.feature_dim == 32


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1), bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    frozen = model.FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is dropped
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(frozen(x), bn(x))


def _torchvision_like_state(net: model.DeepLabV2) -> dict:
    state = {k: v.clone() + 0.5 for k, v in net.backbone.state_dict().items()}
    state.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(7)
                  for k in list(state) if k.endswith("running_var")})
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)
    return state


def test_init_torchvision_and_deeplab_layouts(tmp_path):
    blocks = (1, 1, 1, 1)
    net = model.DeepLabV2(19, blocks=blocks)
    state = _torchvision_like_state(net)
    torch.save(state, tmp_path / "tv.pth")
    loaded, layout = weights.read_init(tmp_path / "tv.pth")
    assert layout == "torchvision"
    weights.load_backbone(net, loaded, layout)
    assert torch.equal(net.backbone.layer4[0].conv3.weight, state["layer4.0.conv3.weight"])
    assert net.bgr is False

    deeplab = {f"Scale.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    deeplab["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(19, 2048, 3, 3)
    torch.save(deeplab, tmp_path / "dl.pth")
    loaded, layout = weights.read_init(tmp_path / "dl.pth")
    assert layout == "deeplab"
    net2 = model.DeepLabV2(19, blocks=blocks, stride_in_1x1=True)
    weights.load_backbone(net2, loaded, layout)
    assert torch.equal(net2.backbone.conv1.weight, state["conv1.weight"]) and net2.bgr is True
    assert net2.backbone.layer2[0].conv1.stride == (2, 2)  # caffe layout: stride in the first 1x1


def test_init_errors_name_missing_and_unexpected_keys(tmp_path):
    net = model.DeepLabV2(19, blocks=(1, 1, 1, 1))
    state = _torchvision_like_state(net)
    del state["layer3.0.conv2.weight"]
    state["layer9.bogus"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['layer3\.0\.conv2\.weight'\].*unexpected keys "
                                         r"\(1\): \['layer9\.bogus'\]"):
        weights.load_backbone(net, state, "torchvision")
    with pytest.raises(ValueError, match="not a file"):
        weights.read_init(tmp_path / "absent.pth")
    torch.save({"weird.key": torch.zeros(1), "other.key": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="torchvision ResNet-101 layout"):
        weights.read_init(tmp_path / "bad.pth")


def test_tiny_has_the_same_interface():
    net = model.TinySegNet(19)
    logits, features = net(torch.rand(2, 3, 32, 48) * 255)
    assert logits.shape == (2, 19, 8, 12) and features.shape == (2, net.feature_dim, 8, 12)


# ---------------------------------------------------------------------------------------------- eval
def test_confusion_matrix_and_iou_against_a_loop():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (2, 9, 7), generator=g)
    target = torch.randint(0, 5, (2, 9, 7), generator=g)
    target[target == 4] = 255
    cm = evaluate.confusion_matrix(pred, target, 4)
    ref = torch.zeros(4, 4, dtype=torch.int64)
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist()):
        if t != 255:
            ref[t, p] += 1
    assert torch.equal(cm, ref)
    iou = evaluate.iou_from_confusion(torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]]))
    assert iou[0] == pytest.approx(75.0) and iou[1] == pytest.approx(200 / 3) and math.isnan(iou[2])
    assert evaluate.mean_iou(iou) == pytest.approx((75.0 + 200 / 3) / 2)


def test_colorize_uses_cityscapes_palette():
    img = figures.colorize(np.array([[0, 10, 255]]))
    assert img[0, 0].tolist() == [128, 64, 128] and img[0, 1].tolist() == [70, 130, 180]
    assert img[0, 2].tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------- pipeline
def test_pipeline_outputs(full_run, fixture_roots):
    out = full_run
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("source_only", "adapted"):
        assert len(metrics[key]["iou"]) == 19 and 0 <= metrics[key]["miou"] <= 100
    assert metrics["config"]["rounds"] == 2 and len(metrics["rounds"]) == 2
    for r in range(2):
        panel = out / "figures" / f"pseudo_labels_round_{r:02d}.png"
        assert panel.is_file() and Image.open(panel).width > 5 * 64
        labels = sorted((out / "pseudo_labels" / f"round_{r:02d}").glob("*.png"))
        assert len(labels) == 6  # one static label map per target train image
        assert set(np.unique(np.asarray(Image.open(labels[0])))) <= set(range(19)) | {255}
    assert (out / "figures" / "training_curves.png").is_file()
    for name in ("checkpoint.pt", "source_only.pt", "adapted.pt", "log.txt"):
        assert (out / name).is_file()
    assert not list(out.glob("*.tmp"))
    log = (out / "log.txt").read_text().strip().splitlines()
    assert any("it/s" in line and "eta" in line and "coverage" in line for line in log)
    assert "diagnostics" not in metrics and not any("target GT" in line for line in log)  # off off the demo
    assert log[-1] == expected_last_line(metrics)


def test_last_printed_line(fixture_roots, tmp_path, capsys):
    gta, cs = fixture_roots
    lines = run_cli(["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--out", str(tmp_path), "--arch", "tiny",
                     *TINY_RUN, "--rounds", "1", "--no-dynamic", "--no-calibration", "--no-contrastive",
                     "--stage1-best-on-target-val", "--control"], capsys)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (tmp_path / "source_best.pt").is_file() and "source_only_continued" in metrics
    assert any(line.startswith("source-only trained for the same total iterations") for line in lines)
    assert lines[-1] == expected_last_line(metrics)


def test_deeplabv2_pipeline_smoke(fixture_roots, tmp_path, capsys):
    """The real architecture through every stage once (layer4 projection features, random init)."""
    gta, cs = fixture_roots
    lines = run_cli(["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--out", str(tmp_path),
                     "--source-iters", "1", "--rounds", "1", "--round-iters", "1", "--batch-size", "1", "--crop", "33",
                     "--resize", "33", "--eval-size", "65x33", "--workers", "0", "--threads", "1", "--log-every", "1",
                     "--features", "layer4", "--proj-dim", "16"], capsys)
    assert any("random weights" in line for line in lines)
    assert lines[-1].startswith("target mIoU: source-only ")
    assert json.loads((tmp_path / "metrics.json").read_text())["config"]["arch"] == "deeplabv2"


def test_target_train_labels_are_never_read_without_diagnostics(full_run):
    opened = (full_run / "opened.txt").read_text().splitlines()
    assert any("gtFine/val" in path for path in opened)  # evaluation reads the val labels
    assert any("leftImg8bit/train" in path for path in opened)
    assert not [path for path in opened if "gtFine/train" in path]


def test_resume_is_exact(full_run, fixture_roots, tmp_path, capsys):
    """Crash in stage 1 and again in round 1 of stage 2, resume from the last periodic checkpoint each time."""
    gta, cs = fixture_roots
    base = ["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--arch", "tiny", "--out", str(tmp_path), *TINY_RUN]
    assert train_with(base, crash_after(5)) == 1  # last checkpoint: iteration 4 of stage 1
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["phase"], ckpt["iteration"], ckpt["step"]) == ("source", 4, 4)
    resume = ["--resume", str(tmp_path / "checkpoint.pt")]
    assert train_with(base + resume, crash_after(13 - 4)) == 1  # 13 steps in all; last: round 1, its iteration 2
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert (ckpt["phase"], ckpt["round"], ckpt["iteration"], ckpt["step"]) == ("adapt", 1, 2, 12)
    assert train_gta2cs.main(base + resume) == 0
    capsys.readouterr()
    a, b = load_checkpoint(full_run / "checkpoint.pt"), load_checkpoint(tmp_path / "checkpoint.pt")
    for key in ("model", "contrast", "optimizer", "scaler", "label_counts", "streams", "history"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])  # (NaN for absent classes)
    assert a["thresholds"] == b["thresholds"] and a["phase"] == b["phase"] == "done"
    undone = sum(not r["kept"] for r in a["decisions"]["rounds"])  # round decisions (default): + a fallback each
    assert a["step"] == b["step"] == 6 + 2 * 4 + 4 * undone
    assert_same_state(a["decisions"], b["decisions"], "decisions")


def test_checkpoint_holds_only_tensors_and_plain_values(full_run):
    """What torch.load(weights_only=True) reads: tensors and plain Python values only (the RNG states, converted
    by uda.checkpoint, aside)."""
    import io

    ckpt = load_checkpoint(full_run / "checkpoint.pt")
    ckpt.pop("rng")
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    buffer.seek(0)
    assert_same_state(torch.load(buffer, weights_only=True), ckpt)
    assert isinstance(ckpt["config"]["eval_size"], list) and isinstance(ckpt["config"]["out"], str)


def test_round_figure_shows_the_last_batch_with_a_legend(full_run):
    """The panel is drawn from the round's last training batch (no file is reopened for it): batch-size rows,
    and a legend under them."""
    panel = np.asarray(Image.open(full_run / "figures" / "pseudo_labels_round_01.png").convert("RGB"))
    scale = 4  # 32-pixel crops enlarged to >= 128
    # the training crops (32 x 32), 4 columns: image, static, dynamic, hybrid (no ground truth without
    # --diagnostics), one row per image of the batch (2)
    assert panel.shape[1] == 4 * (32 + 4) * scale
    rows = 2 * (32 + 4) * scale
    assert panel.shape[0] > 14 + rows + 10  # the header, the rows, then the legend
    legend = panel[14 + rows:]
    assert (legend != 255).any() and (legend == 0).all(-1).any()  # swatches, text, the black "ignore" swatch


def test_demo_dataset_is_deterministic_and_shifted(tmp_path):
    a = write_demo_dataset(tmp_path / "a", seed=1, source_images=2, target_train=2, target_val=1)
    write_demo_dataset(tmp_path / "b", seed=1, source_images=2, target_train=2, target_val=1)
    for rel in ("gta5/images/00001.png", "cityscapes/leftImg8bit/train/demotrain/demotrain_000001_000019_leftImg8bit.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / rel)), np.asarray(Image.open(tmp_path / "b" / rel)))
    src = gta5_files(a[0])
    tgt = cityscapes_files(a[1], "train")
    # flat source (low within-class variation) vs textured, noisy target
    def within_class_std(sample):
        img = np.asarray(Image.open(sample.image)).astype(float)
        lab = read_label(sample.label, Image.open(sample.image).size)
        return np.mean([img[lab == k].std(0).mean() for k in np.unique(lab) if k != 255 and (lab == k).sum() > 50])
    assert within_class_std(tgt[0]) > 2 * within_class_std(src[0])
    assert set(np.unique(read_label(src[0].label, (128, 72)))) <= set(DEMO_CLASSES) | {255}
