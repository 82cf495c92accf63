"""SYNTHIA -> Cityscapes in the reference pipeline: the SYNTHIA reader and its id mapping, the demo in the SYNTHIA
layout, the 16/13-class mIoU and a bf16 run of the whole pipeline."""

from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from examples_helpers import TINY_RUN, data_args, expected_last_line, write_fixture
from PIL import Image

import train_gta2cs
from uda import evaluate
from uda.classes import CITYSCAPES_NAMES, SYNTHIA, SYNTHIA_CLASSES_13, SYNTHIA_CLASSES_16
from uda.datasets import gta5_files, synthia_files
from uda.demo import write_png16
from uda.labels import read_label, read_png_channels, read_sample_label
from uda.scenes import DEMO_CLASSES, TERRAIN, VEGETATION

# SYNTHIA-RAND-CITYSCAPES README: the class ids of GT/LABELS/*.png (first channel), written out independently
SYNTHIA_README = {0: "void", 1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation",
                  7: "pole", 8: "car", 9: "traffic sign", 10: "pedestrian", 11: "bicycle", 12: "motorcycle",
                  13: "parking-slot", 14: "road-work", 15: "traffic light", 16: "terrain", 17: "rider",
                  18: "truck", 19: "bus", 20: "train", 21: "wall", 22: "lanemarking"}
# Cityscapes train ids by name (the protocl method spec, §4)
CITYSCAPES_TRAIN_ID = {"road": 0, "sidewalk": 1, "building": 2, "wall": 3, "fence": 4, "pole": 5,
                       "traffic light": 6, "traffic sign": 7, "vegetation": 8, "terrain": 9, "sky": 10, "person": 11,
                       "rider": 12, "car": 13, "truck": 14, "bus": 15, "train": 16, "motorcycle": 17, "bicycle": 18}
# the benchmark: the 16 classes both datasets have (terrain, truck and train are in SYNTHIA's table but never in
# its images) and the usual 13 (the 16 without wall, fence and pole)
NOT_IN_SYNTHIA = {"terrain", "truck", "train"}
NOT_IN_13 = {"wall", "fence", "pole"}


def expected_train_id(synthia_id: int) -> int:
    name = {"pedestrian": "person"}.get(SYNTHIA_README.get(synthia_id, "void"), SYNTHIA_README.get(synthia_id))
    if name in CITYSCAPES_TRAIN_ID and name not in NOT_IN_SYNTHIA:
        return CITYSCAPES_TRAIN_ID[name]
    return 255


def write_filtered_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit RGB PNG whose rows use the filters None, Sub and Up in turn (an encoder of the test's own)."""
    h, w, _ = array.shape
    rows = array.astype(">u2").reshape(h, w * 3).view(np.uint8).astype(np.int32)
    out = []
    for y in range(h):
        kind = y % 3
        if kind == 1:  # Sub: minus the byte one pixel (6 bytes) to the left
            filtered = rows[y] - np.concatenate([np.zeros(6, np.int32), rows[y][:-6]])
        elif kind == 2:  # Up: minus the byte above
            filtered = rows[y] - rows[y - 1]
        else:
            filtered = rows[y]
        out.append(bytes([kind]) + (filtered % 256).astype(np.uint8).tobytes())

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


def test_synthia_ids_map_to_cityscapes_train_ids(tmp_path):
    g = np.random.default_rng(0)
    ids = np.concatenate([np.arange(23), [23, 40, 255, 256, 259, 1000, 65535, 3, 8]]).astype(np.uint16)
    label = np.zeros((4, 8, 3), np.uint16)
    label[..., 0] = ids.reshape(4, 8)
    label[..., 1] = g.integers(0, 2**16, (4, 8))  # instance ids, full 16 bits
    label[..., 2] = g.integers(0, 2**16, (4, 8))
    write_filtered_png16(tmp_path / "0000000.png", label)
    np.testing.assert_array_equal(read_png_channels(tmp_path / "0000000.png"), label)
    got = read_label(tmp_path / "0000000.png", (8, 4), "synthia")
    expected = np.array([expected_train_id(int(i)) for i in ids]).reshape(4, 8)
    np.testing.assert_array_equal(got, expected)
    assert sorted(set(expected.flatten()) - {255}) == sorted(SYNTHIA_CLASSES_16)  # all 16, nothing else
    # nearest resize of the mapped labels, as for the other datasets
    assert read_label(tmp_path / "0000000.png", (16, 8), "synthia")[::2, ::2].tolist() == expected.tolist()


def test_benchmark_class_lists():
    names = CITYSCAPES_NAMES
    assert {names[k] for k in SYNTHIA_CLASSES_16} == set(CITYSCAPES_TRAIN_ID) - NOT_IN_SYNTHIA
    assert {names[k] for k in SYNTHIA_CLASSES_13} == set(CITYSCAPES_TRAIN_ID) - NOT_IN_SYNTHIA - NOT_IN_13


def test_demo_png16_round_trip(tmp_path):
    array = np.random.default_rng(1).integers(0, 2**16, (5, 7, 3)).astype(np.uint16)
    write_png16(tmp_path / "x.png", array)
    np.testing.assert_array_equal(read_png_channels(tmp_path / "x.png"), array)
    with pytest.raises(ValueError, match="uint16"):
        write_png16(tmp_path / "y.png", array.astype(np.uint8))


def test_demo_in_the_synthia_layout(tmp_path):
    syn, cs = write_fixture(tmp_path / "syn", source="synthia")
    gta, cs_gta = write_fixture(tmp_path / "gta", source="gta5")
    assert syn.name == "synthia" and (syn / "RGB").is_dir() and (syn / "GT" / "LABELS").is_dir()
    samples = synthia_files(syn)
    assert len(samples) == 6 and all(s.label_format == "synthia" for s in samples)
    assert samples[0].image.name == "0000000.png" and samples[0].label == syn / "GT" / "LABELS" / "0000000.png"
    raw = read_png_channels(samples[0].label)
    assert raw.dtype == np.uint16 and raw.shape == (40, 72, 3)
    assert set(np.unique(raw[..., 0])) <= set(SYNTHIA.id_to_train_id) | {0}
    things = np.isin(raw[..., 0], (8, 10))  # car, pedestrian: instance ids beyond 8 bits
    assert things.any() and (raw[..., 1][things] >= 256).all() and (raw[..., 1][~things] == 0).all()
    for sample in samples:
        label = read_sample_label(sample, Image.open(sample.image).size)
        assert set(np.unique(label)) <= (set(DEMO_CLASSES) - {TERRAIN}) | {255}
    # the same scenes whichever source layout: the target split is identical
    for a, b in zip(sorted(cs.rglob("*.png")), sorted(cs_gta.rglob("*.png"))):
        assert a.relative_to(cs) == b.relative_to(cs_gta)
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    # GTA5 terrain pixels are vegetation in the SYNTHIA source (SYNTHIA has no terrain)
    g_label = read_sample_label(gta5_files(gta)[0], (72, 40))
    s_label = read_sample_label(samples[0], (72, 40))
    terrain = g_label == TERRAIN
    assert np.array_equal(s_label[~terrain], g_label[~terrain]) and (s_label[terrain] == VEGETATION).all()


def test_synthia_files_errors_name_path_and_layout(tmp_path):
    with pytest.raises(ValueError, match=r"synthia-root.*RGB/\*\.png.*nowhere"):
        synthia_files(tmp_path / "nowhere")
    (tmp_path / "s" / "RGB").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"RGB.*SYNTHIA-RAND-CITYSCAPES layout.*found none"):
        synthia_files(tmp_path / "s")
    Image.new("RGB", (4, 2)).save(tmp_path / "s" / "RGB" / "0000001.png")
    with pytest.raises(ValueError, match=r"GT/LABELS/0000001\.png"):
        synthia_files(tmp_path / "s")


def test_iou_over_a_class_subset_against_a_loop():
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 50, (19, 19), generator=g)
    subset = SYNTHIA_CLASSES_16
    got = evaluate.iou_over_classes(confusion, subset)
    for value, c in zip(got, subset):
        tp = int(confusion[c, c])
        fn = sum(int(confusion[c, j]) for j in range(19) if j != c)  # predictions of any class, kept rows
        fp = sum(int(confusion[i, c]) for i in subset if i != c)  # ground truth outside the subset: ignored
        assert value == pytest.approx(100 * tp / (tp + fn + fp))
    summary = evaluate.summarize(confusion, {"16": subset, "13": SYNTHIA_CLASSES_13})
    assert summary["miou16"] == pytest.approx(sum(got) / 16) and summary["miou"] == summary["miou16"]
    by_class = dict(zip(subset, got))
    assert summary["miou13"] == pytest.approx(sum(by_class[c] for c in SYNTHIA_CLASSES_13) / 13)
    assert summary["iou16"] == got and [math.isnan(v) for v in summary["iou"]] == [c not in subset for c in range(19)]
    assert summary["iou13"] == [by_class[c] for c in SYNTHIA_CLASSES_13]  # the 16-class protocol's IoUs
    with pytest.raises(ValueError, match="inside subset '16'"):
        evaluate.summarize(confusion, {"16": subset, "x": [9]})
    assert summary["iou19"] == evaluate.iou_from_confusion(confusion)  # the plain 19-class values are kept
    # not a rescaled 19-class mean
    assert summary["miou16"] != pytest.approx(summary["miou19"] * 19 / 16, abs=0.01)


def test_cli_checks_the_source_roots(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--gta5-root given with --source synthia"):
        train_gta2cs.main(["--source", "synthia", "--gta5-root", str(tmp_path), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="give both --synthia-root and --cityscapes-root"):
        train_gta2cs.main(["--synthia-root", str(tmp_path), "--out", str(tmp_path)])
    code = train_gta2cs.main(["--synthia-root", str(tmp_path / "nowhere"), "--cityscapes-root", str(tmp_path),
                              "--arch", "tiny", "--out", str(tmp_path / "out")])
    assert code == 2 and "expected --synthia-root" in capsys.readouterr().err


def test_synthia_pipeline_in_bf16(tmp_path, capsys):
    syn, cs = write_fixture(tmp_path / "data", source="synthia")
    out = tmp_path / "out"
    code = train_gta2cs.main([*data_args(syn, cs, out, "synthia"), *TINY_RUN, "--rounds", "1", "--amp", "bf16",
                              "--diagnostics"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["source"] == "synthia" and metrics["config"]["amp"] == "bf16"
    assert metrics["class_subsets"]["13"] == [CITYSCAPES_NAMES[k] for k in SYNTHIA_CLASSES_13]
    for key in ("source_only", "adapted"):
        result = metrics[key]
        assert set(result) >= {"miou", "miou16", "miou13", "iou", "iou16", "iou13", "miou19", "iou19"}
        assert result["miou"] == result["miou16"] and len(result["iou"]) == 19 and len(result["iou16"]) == 16
        for name in NOT_IN_SYNTHIA:
            assert math.isnan(result["iou"][CITYSCAPES_TRAIN_ID[name]])
        iou13 = [v for k, v in zip(SYNTHIA_CLASSES_16, result["iou16"]) if k in SYNTHIA_CLASSES_13]
        assert result["iou13"] == iou13
        defined = [v for v in iou13 if not math.isnan(v)]
        assert result["miou13"] == pytest.approx(sum(defined) / len(defined))
    assert any(line.startswith("target mIoU over 16 classes (13 classes)") for line in lines)
    assert lines[-1] == expected_last_line(metrics, "miou16")
    assert len(metrics["diagnostics"]) == 1
