"""The prediction command (examples/predict.py, its code in examples/uda/inference.py) on tiny models and generated trees:
checkpoint loading, the server formats, the evaluation's resize rule, the flip average and the round trip
(predictions written, read back and scored = in-process evaluation)."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader
from uda import checkpoint, classes, evaluate, inference, model, network, weights
from uda.datasets import acdc_files, cityscapes_files, folder_files
from uda.demo import write_all
from uda.labels import decode_image
from uda.loading import EvalSet

SPEC_TRAIN_TO_LABEL_ID = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
EVAL_SIZE = (48, 24)


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("layouts"), seed=2)


def tiny(num_classes: int = 19, seed: int = 0) -> torch.nn.Module:
    """A tiny network with a head large enough that its predictions vary over the image."""
    torch.manual_seed(seed)
    net = weights.build_model("tiny", num_classes)
    with torch.no_grad():
        for p in net.classifier.parameters():
            p.normal_(0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "adapted.pt"
    torch.save({"model": tiny().state_dict(), "config": {"arch": "tiny", "eval_size": EVAL_SIZE}}, path)
    return path


# ------------------------------------------------------------------------------------------------ loading
def test_checkpoint_formats_load_with_weights_only(ckpt, tmp_path):
    net, config = inference.load_model(ckpt)
    assert config["eval_size"] == EVAL_SIZE and net.num_classes == 19
    x = torch.randint(0, 255, (1, 3, 32, 48), dtype=torch.uint8)
    reference = tiny()(x)[0]
    assert torch.equal(net(x)[0], reference)
    bare = tmp_path / "bare.pt"
    torch.save(tiny().state_dict(), bare)
    assert torch.equal(inference.load_model(bare)[0](x)[0], reference)
    # a run's checkpoint.pt carries the RNG states next to the model, as plain tensors and lists
    full = tmp_path / "checkpoint.pt"
    torch.save({"model": tiny().state_dict(), "config": {}, "rng": checkpoint.rng_state()}, full)
    assert torch.equal(inference.load_model(full)[0](x)[0], reference)
    # NumPy arrays (what checkpoints held before issue 17) are refused like any object: nothing is unpickled
    old = tmp_path / "old.pt"
    torch.save({"model": tiny().state_dict(), "rng": {"numpy": np.random.get_state(), "python": random.getstate()}},
               old)
    with pytest.raises(ValueError, match="--checkpoint.*weights_only=True"):
        inference.load_model(old)


class NotWeights:
    pass


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint.*not a file"):
        inference.load_model(tmp_path / "missing.pt")
    evil = tmp_path / "object.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": NotWeights()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        inference.load_model(evil)
    other = tmp_path / "other.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, other)
    with pytest.raises(ValueError, match="checkpoint of this pipeline"):
        inference.load_model(other)


def test_deeplab_architecture_is_read_from_the_weights(tmp_path):
    torch.manual_seed(0)
    net = model.DeepLabV2(5, features="layer4", proj_dim=16, stride_in_1x1=True, blocks=(1, 1, 2, 1)).eval()
    net.set_normalization(network.CAFFE_MEAN_BGR, (1.0, 1.0, 1.0), bgr=True)
    path = tmp_path / "deeplab.pt"
    torch.save({"model": net.state_dict()}, path)
    again, _ = inference.load_model(path)
    assert isinstance(again, model.DeepLabV2) and again.num_classes == 5 and again.bgr
    assert again.feature_dim == 16 and len(again.backbone.layer3) == 2
    assert again.backbone.layer2[0].conv1.stride == (2, 2)  # the DeepLab init layout's stride position
    x = torch.randint(0, 255, (1, 3, 33, 33), dtype=torch.uint8)
    assert torch.equal(again(x)[0], net(x)[0])


# --------------------------------------------------------------------------------------------- prediction
def test_resize_rule_is_the_evaluations(trees):
    net = tiny()
    sample = cityscapes_files(trees["cityscapes"], "val")[0]
    image = decode_image(sample.image)
    pred = inference.predict(net, image, EVAL_SIZE)
    assert pred.shape == (image.size[1], image.size[0]) and pred.dtype == np.uint8
    item = EvalSet([sample], size=EVAL_SIZE)[0]  # the evaluation's input
    logits, _ = net(item["image"][None])
    expected = F.interpolate(logits, size=item["label"].shape, mode="bilinear", align_corners=False).argmax(1)[0]
    assert np.array_equal(pred, expected.numpy())
    assert len(np.unique(pred)) > 1


def test_flip_average(trees):
    net = tiny()
    image = decode_image(cityscapes_files(trees["cityscapes"], "val")[1].image)
    mirror = image.transpose(Image.FLIP_LEFT_RIGHT)
    probs = inference.probabilities(net, image, EVAL_SIZE, flip=True)
    # averaging over the image and its mirror makes the prediction mirror-equivariant
    assert torch.allclose(inference.probabilities(net, mirror, EVAL_SIZE, flip=True), probs.flip(-1), atol=1e-6)
    # and it is the mean of the two softmaxes
    plain = inference.probabilities(net, image, EVAL_SIZE).softmax(0)
    mirrored = inference.probabilities(net, mirror, EVAL_SIZE).softmax(0).flip(-1)
    assert torch.allclose(probs, 0.5 * (plain + mirrored), atol=1e-5)
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the net is not symmetric by itself


def test_writer_formats(trees, tmp_path):
    net = tiny()
    samples = acdc_files(trees["acdc"], "test", "night")
    result = inference.predict_samples(net, samples, tmp_path, table=classes.CITYSCAPES, eval_size=EVAL_SIZE,
                                     log=None)
    assert result is None  # test split: no labels, nothing scored
    palette = np.array(classes.CITYSCAPES_PALETTE, np.uint8)
    for s in samples:
        file = s.image.stem + ".png"  # <stem>_rgb_anon.png, as the servers' tools name predictions
        train_ids = np.asarray(Image.open(tmp_path / "trainids" / file))
        image = np.asarray(Image.open(s.image))
        assert train_ids.shape == image.shape[:2] and train_ids.dtype == np.uint8 and train_ids.max() < 19
        assert np.array_equal(train_ids, inference.predict(net, decode_image(s.image), EVAL_SIZE))
        label_ids = np.asarray(Image.open(tmp_path / "labelids" / file))
        assert np.array_equal(label_ids, np.array(SPEC_TRAIN_TO_LABEL_ID, np.uint8)[train_ids])
        colour = np.asarray(Image.open(tmp_path / "colour" / file))
        assert np.array_equal(colour, palette[train_ids])
        blend = np.asarray(Image.open(tmp_path / "overlay" / file)).astype(int)
        assert np.abs(blend - (colour.astype(int) + image.astype(int)) / 2).max() <= 1


def test_custom_classes_and_k_mismatch(trees, tmp_path):
    table = classes.ClassTable.from_file(trees["folder"] / "classes.json")
    samples = folder_files(trees["folder"] / "target", table, "val")
    with pytest.raises(ValueError, match="model's K=19 classes.*K=5"):
        inference.predict_samples(tiny(19), samples, tmp_path, table=table, eval_size=EVAL_SIZE, log=None)
    result = inference.predict_samples(tiny(5), samples, tmp_path, table=table, eval_size=EVAL_SIZE,
                                     kinds=("trainids", "labelids"), log=None)
    assert len(result["iou"]) == 5 and not (tmp_path / "colour").exists()
    ids = np.concatenate([np.asarray(Image.open(p)).ravel() for p in (tmp_path / "labelids").iterdir()])
    assert set(np.unique(ids).tolist()) <= {11, 21, 31, 41, 51}  # each class's first raw id


# ---------------------------------------------------------------------------------------------- round trip
def test_round_trip_equals_in_process_evaluation(trees, tmp_path):
    net = tiny()
    samples = cityscapes_files(trees["cityscapes"], "val")
    written = inference.predict_samples(net, samples, tmp_path, table=classes.CITYSCAPES, eval_size=EVAL_SIZE,
                                      kinds=("trainids",), log=None)
    in_process = evaluate.evaluate(net, DataLoader(EvalSet(samples, size=EVAL_SIZE), batch_size=1), 19,
                                   torch.device("cpu"))
    scored = inference.score_predictions(tmp_path / "trainids", samples, 19)
    assert scored["miou"] == pytest.approx(in_process["miou"], abs=1e-12)
    assert scored["confusion"] == written["confusion"]
    assert written["miou"] == pytest.approx(in_process["miou"], abs=1e-12) and in_process["miou"] > 0


def test_round_trip_acdc(trees, tmp_path):
    net = tiny(seed=3)
    samples = acdc_files(trees["acdc"], "val", "all")
    written = inference.predict_samples(net, samples, tmp_path, table=classes.CITYSCAPES, eval_size=EVAL_SIZE,
                                      kinds=("trainids",), log=None)
    # in process, independently: the evaluation's resize rule and confusion matrix over the train-id labels
    confusion = torch.zeros(19, 19, dtype=torch.int64)
    for s in samples:
        image = decode_image(s.image)
        x = torch.from_numpy(np.asarray(image.resize(EVAL_SIZE, Image.BILINEAR)).transpose(2, 0, 1).copy())[None]
        logits = F.interpolate(net(x)[0], size=image.size[::-1], mode="bilinear", align_corners=False)
        label = torch.from_numpy(np.asarray(Image.open(s.label)).astype(np.int64))
        confusion += evaluate.confusion_matrix(logits.argmax(1)[0], label, 19)
    scored = inference.score_predictions(tmp_path / "trainids", samples, 19)
    assert scored["confusion"] == written["confusion"] == confusion.tolist()
    assert scored["miou"] == pytest.approx(evaluate.summarize(confusion)["miou"], abs=1e-12)


def test_score_rejects_label_id_files(trees, tmp_path):
    samples = cityscapes_files(trees["cityscapes"], "val")
    inference.predict_samples(tiny(), samples, tmp_path, table=classes.CITYSCAPES, eval_size=EVAL_SIZE,
                            kinds=("labelids",), log=None)
    assert max(int(np.asarray(Image.open(p)).max()) for p in (tmp_path / "labelids").iterdir()) >= 19
    with pytest.raises(ValueError, match="train ids < K=19.*label-id file"):
        inference.score_predictions(tmp_path / "labelids", samples, 19)
    with pytest.raises(ValueError, match="expected the prediction"):
        inference.score_predictions(tmp_path / "nothing", samples, 19)


# -------------------------------------------------------------------------------------------------- CLI
def test_cli_predict_and_score(trees, ckpt, tmp_path, capsys):
    out = tmp_path / "pred"
    code = inference.main(["--checkpoint", str(ckpt), "--dataset", "darkzurich", "--root", str(trees["darkzurich"]),
                         "--split", "val", "--out", str(out), "--flip"])
    printed = capsys.readouterr().out
    assert code == 0 and "| **mIoU** |" in printed and "with flip" in printed
    miou = [line for line in printed.splitlines() if line.startswith("mIoU: ")][-1]
    assert sorted(p.name for p in out.iterdir()) == ["colour", "labelids", "metrics.json", "overlay", "trainids"]
    code = inference.main(["--score", str(out / "trainids"), "--dataset", "darkzurich", "--root",
                         str(trees["darkzurich"]), "--split", "val"])
    assert code == 0 and miou in capsys.readouterr().out
    # unlabelled images: a plain folder
    code = inference.main(["--checkpoint", str(ckpt), "--images", str(trees["darkzurich"] / "rgb_anon" / "test"),
                         "--out", str(tmp_path / "folder"), "--write", "trainids"])
    assert code == 0 and len(list((tmp_path / "folder" / "trainids").iterdir())) == 2
    assert "IoU" not in capsys.readouterr().out


def test_cli_errors(trees, ckpt, tmp_path, capsys):
    assert inference.main(["--checkpoint", str(tmp_path / "none.pt"), "--images", ".", "--out", str(tmp_path)]) == 2
    assert "not a file" in capsys.readouterr().err
    assert inference.main(["--checkpoint", str(ckpt), "--dataset", "folder", "--root", str(trees["folder"]),
                         "--out", str(tmp_path)]) == 2
    assert "--class-table" in capsys.readouterr().err
    bare = tmp_path / "bare.pt"
    torch.save(tiny().state_dict(), bare)
    assert inference.main(["--checkpoint", str(bare), "--images", str(trees["acdc"]), "--out", str(tmp_path)]) == 2
    assert "--eval-size" in capsys.readouterr().err


def test_cli_uses_the_checkpoints_class_table(trees, tmp_path, capsys):
    table = classes.ClassTable.from_file(trees["folder"] / "classes.json")
    path = tmp_path / "five.pt"
    torch.save({"model": tiny(5).state_dict(), "config": {"eval_size": EVAL_SIZE}, "classes": table.to_dict()}, path)
    code = inference.main(["--checkpoint", str(path), "--dataset", "folder", "--root", str(trees["folder"] / "target"),
                         "--split", "val", "--class-table", str(trees["folder"] / "classes.json"),
                         "--out", str(tmp_path / "a")])
    assert code == 0 and "| structure |" in capsys.readouterr().out
    code = inference.main(["--checkpoint", str(path), "--images", str(trees["folder"] / "target" / "val" / "images"),
                         "--out", str(tmp_path / "b"), "--write", "colour"])
    assert code == 0
    colours = {tuple(c) for p in (tmp_path / "b" / "colour").iterdir() for c in np.asarray(Image.open(p)).reshape(-1, 3)}
    assert colours <= set(table.colours)
    bare = tmp_path / "bare5.pt"
    torch.save({"model": tiny(5).state_dict(), "config": {"eval_size": EVAL_SIZE}}, bare)
    assert inference.main(["--checkpoint", str(bare), "--images", str(trees["acdc"]), "--out", str(tmp_path)]) == 2
    assert "--class-table for a checkpoint with K=5" in capsys.readouterr().err
