"""Class tables (examples/uda/classes.py): built-in tables, the JSON format, lookup tables and named errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from uda import classes
from uda.classes import ClassTable

# Cityscapes label id -> train id and a few palette colours (cityscapesScripts' labels.py), written out here
SPEC_ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
SPEC_COLOURS = {0: (128, 64, 128), 2: (70, 70, 70), 10: (70, 130, 180), 13: (0, 0, 142), 18: (119, 11, 32)}


def write_table(tmp_path: Path, spec) -> Path:
    path = tmp_path / "table.json"
    path.write_text(json.dumps(spec))
    return path


GOOD = {"name": "mine", "classes": [
    {"name": "background", "ids": [0], "colour": [0, 0, 0]},
    {"name": "road", "ids": [7, 9], "colour": [128, 64, 128]},
    {"name": "car", "ids": [26], "colour": [0, 0, 142]},
], "ignore_ids": [255]}


# ------------------------------------------------------------------------------------------- built-in tables
def test_cityscapes_table_maps_label_ids_to_the_19_train_ids():
    table = classes.CITYSCAPES
    assert table.num_classes == 19
    lut = table.lut(8)
    for raw in range(256):
        assert lut[raw] == SPEC_ID_TO_TRAIN_ID.get(raw, 255), raw
    assert table.map_ids(np.array([[7, 26, 0, 34, 255]], np.uint8)).tolist() == [[0, 13, 255, 255, 255]]
    for k, colour in SPEC_COLOURS.items():
        assert table.colours[k] == colour
    # the output ids of label-id predictions are the Cityscapes label ids
    assert table.to_output_ids(np.arange(19, dtype=np.uint8)).tolist() == sorted(SPEC_ID_TO_TRAIN_ID)


def test_train_id_table_is_the_identity_and_rejects_label_ids():
    table = classes.CITYSCAPES.train_id_table()
    assert table.names == classes.CITYSCAPES.names
    values = np.array([list(range(19)) + [255]], np.uint8)
    assert np.array_equal(table.map_ids(values), values)
    with pytest.raises(ValueError, match=r"gt/x_gt_labelTrainIds\.png.*unmapped id\(s\) 26"):
        table.map_ids(np.array([[0, 26]], np.uint8), source="gt/x_gt_labelTrainIds.png")


def test_synthia_table_keeps_k19_and_labels_16_classes():
    table = classes.SYNTHIA
    assert table.num_classes == 19 and table.names == classes.CITYSCAPES.names
    lut = table.lut(16)
    mapped = sorted(set(lut[lut != 255].tolist()))
    assert mapped == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18]  # no terrain, truck, train
    assert lut[3] == 0 and lut[8] == 13 and lut[11] == 18 and lut[0] == 255  # road, car, bicycle, void
    classes.CITYSCAPES.check_compatible(table)


def test_default_palette_is_distinct_and_starts_with_cityscapes():
    palette = classes.default_palette(60)
    assert len(set(palette)) == 60
    assert palette[:19] == classes.CITYSCAPES_PALETTE


# ---------------------------------------------------------------------------------------------- file format
def test_json_table_round_trip(tmp_path):
    table = ClassTable.from_file(write_table(tmp_path, GOOD))
    assert table.name == "mine" and table.num_classes == 3
    assert table.names == ("background", "road", "car")
    assert table.map_ids(np.array([0, 7, 9, 26, 255], np.uint8)).tolist() == [0, 1, 1, 2, 255]
    assert table.output_ids == (0, 7, 26)
    assert table.colorize(np.array([[2, 255]], np.uint8)).tolist() == [[[0, 0, 142], [0, 0, 0]]]
    assert ClassTable.from_dict(table.to_dict()) == table
    saved = table.save(tmp_path / "again.json")
    assert ClassTable.from_file(saved) == table
    assert pickle.loads(pickle.dumps(table)) == table and hash(table) == hash(ClassTable.from_dict(GOOD))


def test_train_id_field_orders_the_classes_and_default_colours(tmp_path):
    spec = {"classes": [{"name": "b", "ids": [5], "train_id": 1}, {"name": "a", "ids": [4], "train_id": 0}]}
    table = ClassTable.from_file(write_table(tmp_path, spec))
    assert table.names == ("a", "b") and table.name == "table"
    assert table.map_ids(np.array([4, 5], np.uint8)).tolist() == [0, 1]
    assert table.colours == classes.default_palette(2)


def test_16_bit_ids_and_lookup_tables():
    table = ClassTable.from_classes("wide", ["low", "high"], [[3], [1000, 65535]], ignore_ids=[0])
    ids = np.array([[3, 1000, 65535, 0]], np.uint16)
    assert table.map_ids(ids).tolist() == [[0, 1, 1, 255]]
    assert table.lut(16).shape == (65536,) and table.lut(16)[1000] == 1
    with pytest.raises(ValueError, match="8-bit lookup table.*bits=16"):
        table.lut(8)
    with pytest.raises(ValueError, match="0..65535.*-1..70000"):
        table.map_ids(np.array([-1, 70000], np.int64))
    assert table.to_output_ids(np.array([1, 0], np.uint8)).dtype == np.uint16


def test_unlisted_ignore_maps_unknown_ids_to_ignore():
    table = ClassTable.from_classes("lenient", ["a", "b"], [[1], [2]], unlisted="ignore")
    assert table.map_ids(np.array([1, 2, 3, 200], np.uint8)).tolist() == [0, 1, 255, 255]


# ------------------------------------------------------------------------------------------------- errors
def test_unmapped_id_names_the_file_and_the_id(tmp_path):
    table = ClassTable.from_file(write_table(tmp_path, GOOD))
    with pytest.raises(ValueError, match=r"labels/img_7\.png.*unmapped id\(s\) 3, 42 on 3 pixels"):
        table.map_ids(np.array([[0, 3, 42, 42]], np.uint8), source="labels/img_7.png")


@pytest.mark.parametrize("spec, message", [
    ({"classes": [{"name": "a", "ids": [1], "train_id": 0}, {"name": "b", "ids": [2], "train_id": 0},
                  {"name": "c", "ids": [3], "train_id": 1}]}, r"one name per train id.*train id 0 for \['a', 'b'\]"),
    ({"classes": [{"name": "road", "ids": [1]}, {"name": "Road", "ids": [2]}]},
     r"one train id per class name.*'Road' at train ids 0 and 1"),
    ({"classes": [{"name": "a", "ids": [1, 2]}, {"name": "b", "ids": [2]}]}, r"id 2 for 'a' and 'b'"),
    ({"classes": [{"name": "only", "ids": [1]}]}, r"at least K=2 classes.*got K=1"),
    ({"classes": [{"name": "a", "ids": [1], "colour": [1, 2]}, {"name": "b", "ids": [2], "colour": [1, 2]}]},
     r"colours of shape \(K, 3\) = \(2, 3\).*got shape \(2, 2\)"),
    ({"classes": [{"name": "a", "ids": [1], "colour": [1, 2, 300]}, {"name": "b", "ids": [2], "colour": [0, 0, 0]}]},
     r"colours as integers in 0..255"),
    ({"classes": [{"name": "a", "ids": [1], "colour": [1, 2, 3]}, {"name": "b", "ids": [2]}]},
     r"colour in every class entry.*or in none"),
    ({"classes": [{"name": "a", "ids": [1]}, {"name": "b", "ids": [2]}], "ignore_ids": [2]},
     r"ignore_ids disjoint.*\[2\] in both"),
    ({"classes": [{"name": "a", "ids": [1], "train_id": 0}, {"name": "b", "ids": [2], "train_id": 2}]},
     r"train ids .* to be 0..1, got \[0, 2\]"),
    ({"classes": [{"name": "a", "ids": [1]}, {"name": "b", "ids": ["x"]}]}, r"integer label ids, got 'x'"),
    ({"classes": [{"name": "a", "ids": [1]}, {"name": "b", "ids": [70000]}]}, r"in 0..65535, got 70000"),
    ({"classes": [{"name": "a", "ids": [1]}, {"name": "b", "ids": [2]}], "unlisted": "maybe"}, r"unlisted in"),
    ({"classes": [{"name": "a"}, {"name": "b", "ids": [2]}]}, r"entry 0 to have name and ids"),
    ({"classes": [], "extra": 1}, r"keys among name, classes, ignore_ids, unlisted, got \['extra'\]"),
    ([1, 2], r"JSON object with a 'classes' list, got list"),
])
def test_invalid_tables_raise_named_errors(tmp_path, spec, message):
    with pytest.raises(ValueError, match=message):
        ClassTable.from_file(write_table(tmp_path, spec))


def test_colours_of_the_wrong_count_raise():
    with pytest.raises(ValueError, match=r"\(3, 3\).*got shape \(2, 3\)"):
        ClassTable.from_classes("x", ["a", "b", "c"], [[1], [2], [3]], colours=[(0, 0, 0), (1, 1, 1)])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ValueError, match="--class-table.*not a file"):
        ClassTable.from_file(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        ClassTable.from_file(bad)


def test_source_target_mismatch():
    five = ClassTable.from_classes("five", list("abcde"), [[i] for i in range(5)])
    with pytest.raises(ValueError, match=r"same number of classes K.*K=19 \('cityscapes'\) and K=5 \('five'\)"):
        classes.CITYSCAPES.check_compatible(five)
    renamed = ClassTable.from_classes("other", list("abcdx"), [[i] for i in range(5)])
    with pytest.raises(ValueError, match=r"'e' \('five'\) and 'x' \('other'\) at train id 4"):
        five.check_compatible(renamed)


def test_load_table_builtins_and_files(tmp_path):
    assert classes.load_table(None) is classes.CITYSCAPES
    assert classes.load_table("synthia") is classes.SYNTHIA
    assert classes.load_table(str(write_table(tmp_path, GOOD))).name == "mine"
