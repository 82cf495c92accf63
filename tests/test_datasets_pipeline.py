"""The whole pipeline (examples/train_gta2cs.py) beyond GTA5/SYNTHIA -> Cityscapes, end to end on tiny generated
data in the real layouts: a K = 5 custom-classes folder run, Cityscapes -> ACDC and Cityscapes -> Dark Zurich,
the options, and the checkpoint -> examples/predict.py round trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import train_gta2cs
from examples_helpers import TINY_RUN, build
from uda import classes, options
from uda import inference as predict
from uda.demo import write_acdc, write_cityscapes, write_darkzurich, write_folder
from PIL import Image

SIZE = (64, 32)


@pytest.fixture(scope="module")
def custom(tmp_path_factory):
    """A K = 5 run, folder -> folder (8-bit source ids through their own table, the target's 16-bit ids through
    its table), with diagnostics; returns (out, data roots)."""
    root = tmp_path_factory.mktemp("custom")
    src8, _, table8 = write_folder(root / "eight", seed=4, source=6, train=2, val=2, size=SIZE)
    _, tgt16, table16 = write_folder(root / "sixteen", seed=5, bits=16, source=2, train=6, val=3,
                                     size=SIZE)
    out = root / "run"
    code = train_gta2cs.main(["--source", "folder", "--source-root", str(src8), "--source-class-table", str(table8),
                              "--target", "folder", "--target-root", str(tgt16), "--class-table", str(table16),
                              "--arch", "tiny", "--out", str(out), "--diagnostics", "--control", *TINY_RUN])
    assert code == 0
    return out, {"source": src8, "target": tgt16, "table": table16}


def test_custom_classes_run_end_to_end(custom):
    out, roots = custom
    table = classes.ClassTable.from_file(roots["table"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["class_names"] == ["ground", "structure", "vegetation", "sky", "object"]
    for key in ("source_only", "adapted", "source_only_continued"):
        assert len(metrics[key]["iou"]) == 5 and 0 <= metrics[key]["miou"] <= 100
    assert metrics["config"]["classes"] == table.to_dict()
    for entry in metrics["diagnostics"]:
        assert all(len(entry[kind]["coverage"]) == 5 for kind in ("static", "dynamic", "hybrid"))
    for name in ("source_only.pt", "adapted.pt", "checkpoint.pt"):
        ckpt = torch.load(out / name, map_location="cpu", weights_only=False)
        assert ckpt["model"]["classifier.branches.0.weight"].shape[0] == 5
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["contrast"]["source_ema.prototypes"].shape == (5, 4 * 5)  # K prototypes of D = 4K features
    log = (out / "log.txt").read_text()
    assert "K=5 classes" in log and "| structure |" in log
    # the round's figure is drawn in the table's colours
    panel = np.asarray(Image.open(sorted((out / "figures").glob("pseudo_labels_round_*.png"))[-1]).convert("RGB"))
    colours = {tuple(int(v) for v in c) for c in panel.reshape(-1, 3)}
    assert set(table.colours) & colours
    assert not {(244, 35, 232), (220, 220, 0)} & colours  # Cityscapes sidewalk / traffic sign: not in the table


def test_custom_checkpoint_predicts_the_runs_miou(custom, tmp_path, capsys):
    """The checkpoint carries its class table; predict.py on the target val split gives the run's mIoU."""
    out, roots = custom
    metrics = json.loads((out / "metrics.json").read_text())
    code = predict.main(["--checkpoint", str(out / "adapted.pt"), "--dataset", "folder", "--root",
                         str(roots["target"]), "--split", "val", "--out", str(tmp_path)])  # its own table
    assert code == 0
    scored = json.loads((tmp_path / "metrics.json").read_text())
    assert scored["miou"] == pytest.approx(metrics["adapted"]["miou"], abs=1e-9)
    assert scored["class_names"] == metrics["class_names"]
    ids = {int(v) for p in (tmp_path / "labelids").iterdir() for v in np.unique(np.asarray(Image.open(p)))}
    assert ids <= {1011, 1021, 1031, 1041, 1051}  # the 16-bit table's first raw id of each class
    capsys.readouterr()


def test_cityscapes_to_acdc_end_to_end(tmp_path):
    cs = write_cityscapes(tmp_path / "cityscapes", seed=6, train=6, val=0, size=SIZE)
    acdc = write_acdc(tmp_path / "acdc", seed=6, train=3, val=1, test=1, size=SIZE)
    out = tmp_path / "run"
    args = ["--source", "cityscapes", "--cityscapes-root", str(cs), "--target", "acdc", "--acdc-root", str(acdc),
            "--arch", "tiny", "--out", str(out), *TINY_RUN]
    run = build(args + ["--out", str(tmp_path / "built")])
    assert (len(run.target_train), len(run.target_val)) == (12, 4) and run.num_classes == 19
    item = run.val_loader.loader.dataset[0]  # the evaluation reads ACDC's train ids as they are (not mapped twice)
    stored = np.asarray(Image.open(run.target_val[0].label))
    assert np.array_equal(item["label"].numpy(), stored)
    assert train_gta2cs.main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["target"] == "acdc" and len(metrics["adapted"]["iou"]) == 19
    assert not math.isnan(metrics["adapted"]["miou"])
    code = predict.main(["--checkpoint", str(out / "adapted.pt"), "--dataset", "acdc", "--root", str(acdc),
                         "--split", "val", "--out", str(tmp_path / "pred"), "--write", "trainids"])
    assert code == 0
    assert json.loads((tmp_path / "pred" / "metrics.json").read_text())["miou"] == pytest.approx(
        metrics["adapted"]["miou"], abs=1e-9)


def test_cityscapes_to_darkzurich_and_one_acdc_condition(tmp_path):
    cs = write_cityscapes(tmp_path / "cityscapes", seed=7, train=4, val=0, size=SIZE)
    dz = write_darkzurich(tmp_path / "dz", seed=7, train=4, val=2, test=1, size=SIZE)
    acdc = write_acdc(tmp_path / "acdc", seed=7, train=2, val=1, test=0, size=SIZE)
    run = build(["--source", "cityscapes", "--cityscapes-root", str(cs), "--target", "darkzurich",
                 "--darkzurich-root", str(dz), "--arch", "tiny", "--out", str(tmp_path / "a"), *TINY_RUN])
    assert (len(run.target_train), len(run.target_val)) == (4, 2)
    run = build(["--source", "cityscapes", "--cityscapes-root", str(cs), "--target", "acdc", "--acdc-root",
                 str(acdc), "--acdc-conditions", "night", "snow", "--arch", "tiny", "--out", str(tmp_path / "b"),
                 *TINY_RUN])
    assert {s.image.parts[-4] for s in run.target_train + run.target_val} == {"night", "snow"}
    with pytest.raises(ValueError, match="expected target train labels for --diagnostics"):
        build(["--source", "cityscapes", "--cityscapes-root", str(cs), "--target", "darkzurich",
               "--darkzurich-root", str(dz), "--arch", "tiny", "--out", str(tmp_path / "c"), "--diagnostics",
               *TINY_RUN])


def test_options(tmp_path):
    args = options.parse_args(["--source", "cityscapes", "--target", "acdc", "--out", str(tmp_path)])
    assert args.demo and args.acdc_root == str(tmp_path / "demo_data" / "cityscapes_to_acdc" / "acdc")
    assert args.acdc_conditions == ["fog", "night", "rain", "snow"]
    args = options.parse_args(["--source", "folder", "--target", "folder", "--out", str(tmp_path)])
    assert args.class_table == str(tmp_path / "demo_data" / "folder_to_folder" / "classes.json")
    old = options.parse_args(["--gta5-root", "g", "--cityscapes-root", "c"])  # the original options still work
    assert (old.source, old.target, old.demo) == ("gta5", "cityscapes", False)
    assert options.parse_args(["--synthia-root", "s", "--cityscapes-root", "c"]).source == "synthia"
    errors = [
        (["--target", "folder", "--source", "folder", "--source-root", "s", "--target-root", "t"], "--class-table"),
        (["--acdc-root", "a", "--cityscapes-root", "c", "--gta5-root", "g"], "--acdc-root given with --source gta5"),
        (["--source", "cityscapes", "--target", "cityscapes"], "both cityscapes"),
        (["--source", "cityscapes", "--target", "acdc", "--cityscapes-root", "c"], "give both --cityscapes-root "
                                                                                   "and --acdc-root"),
        (["--source", "gta5", "--target", "acdc"], "embedded demo exists for"),
        (["--source-class-table", "t.json", "--gta5-root", "g", "--cityscapes-root", "c"], "built-in classes"),
    ]
    for argv, message in errors:
        with pytest.raises(SystemExit, match=message):
            options.parse_args(argv)


def test_k_mismatch_between_domains_is_a_clear_error(tmp_path, capsys):
    src, tgt, table = write_folder(tmp_path / "mine", seed=8, source=2, train=2, val=1, size=SIZE)
    cs = write_cityscapes(tmp_path / "cityscapes", seed=8, train=2, val=0, size=SIZE)
    code = train_gta2cs.main(["--source", "cityscapes", "--cityscapes-root", str(cs), "--target", "folder",
                              "--target-root", str(tgt), "--class-table", str(table), "--arch", "tiny", "--out",
                              str(tmp_path / "run"), *TINY_RUN])
    err = capsys.readouterr().err
    assert code == 2 and "same number of classes K for --source cityscapes and --target folder" in err
    assert "K=19" in err and "K=5" in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"classes": [{"name": "x", "ids": [11]}]}))
    code = train_gta2cs.main(["--source", "folder", "--source-root", str(src), "--target", "folder",
                              "--target-root", str(tgt), "--class-table", str(bad), "--arch", "tiny", "--out",
                              str(tmp_path / "run2"), *TINY_RUN])
    assert code == 2 and "at least K=2 classes" in capsys.readouterr().err


@pytest.mark.slow
def test_generated_demo_cityscapes_to_acdc_runs(tmp_path):
    """``--source cityscapes --target acdc`` without roots: the generated demo (written by setup) trains."""
    out = tmp_path / "run"
    assert train_gta2cs.main(["--source", "cityscapes", "--target", "acdc", "--out", str(out), *TINY_RUN]) == 0
    assert (out / "demo_data" / "cityscapes_to_acdc" / ".complete").is_file()
    assert json.loads((out / "metrics.json").read_text())["config"]["target"] == "acdc"


def test_bad_custom_label_is_named_by_the_preflight_check_and_skipped_on_request(tmp_path, capsys):
    src, tgt, table = write_folder(tmp_path / "mine", seed=9, source=4, train=2, val=1, size=SIZE)
    bad = src / "labels" / "src_0001.png"
    ids = np.asarray(Image.open(bad)).copy()
    ids[:2, :2] = 77  # an id the class table does not know
    Image.fromarray(ids).save(bad)
    argv = ["--source", "folder", "--source-root", str(src), "--target", "folder", "--target-root", str(tgt),
            "--class-table", str(table), "--arch", "tiny", *TINY_RUN]
    assert train_gta2cs.main([*argv, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "pre-flight data check: 1 bad file(s)" in err and "src_0001.png" in err and "unmapped id(s) 77" in err
    assert train_gta2cs.main([*argv, "--out", str(tmp_path / "b"), "--no-check-data", "--on-bad-sample",
                              "skip"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["bad_samples"]["skipped"] > 0 and any("src_0001.png" in f for f in metrics["bad_samples"]["files"])
