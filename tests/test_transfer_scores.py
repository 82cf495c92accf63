"""Issue 35's study tooling: the real-data shifts (benchmarks/study/real_shifts.py) and the round-score transfer
study (benchmarks/study/transfer_scores.py): its scores against plain float64 loops, its decisions on hand-built
trees, leave-one-shift-out, the cached tables and the default that follows from them."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from uda import options
from uda.datasets import cityscapes_files, gta5_files
from uda.labels import read_label

from benchmarks.study import real_shifts, transfer_scores as ts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "issue35"
TINY = {"source_images": 3, "target_train": 3, "target_val": 2, "size": (64, 32)}


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*.png")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("shift", real_shifts.REAL_SHIFTS)
def test_real_shift_reads_back_and_is_seeded(shift, tmp_path):
    gta, cs = real_shifts.write_real_shift(shift, tmp_path / "a", seed=1, **TINY)
    real_shifts.write_real_shift(shift, tmp_path / "b", seed=1, **TINY)
    other = real_shifts.write_real_shift(shift, tmp_path / "c", seed=2, **TINY)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    allowed = ({real_shifts.BACKGROUND, *real_shifts.DIGIT_IDS} if shift == "digits" else
               {real_shifts.BACKGROUND, real_shifts.FACE, real_shifts.NON_FACE})
    samples = gta5_files(gta) + cityscapes_files(cs, "train") + cityscapes_files(cs, "val")
    assert len(samples) == 3 + 3 + 2
    seen = set()
    for sample in samples:
        label = read_label(sample.label, (64, 32))
        seen |= set(np.unique(label).tolist())
    assert seen <= allowed and len(seen) >= 3  # the background and at least two objects' classes
    assert other[0].is_dir()


def test_real_shift_sources():
    images, classes = real_shifts.handwritten_digits()
    assert images.shape == (1797, 8, 8) and 0 <= images.min() and images.max() <= 1
    assert set(classes.tolist()) == set(range(10))
    glyph = real_shifts._typeset(7, 24, real_shifts.SOURCE_FONTS[0])
    assert glyph.shape == (24, 24) and glyph.max() > 0.9 and 0.05 < (glyph > 0.5).mean() < 0.6
    faces = real_shifts._faces()
    assert faces.shape == (200, 25, 25)
    for split in ("source", "train", "val"):  # the people and patches of the domains do not overlap
        for other in ("source", "train", "val"):
            if split != other:
                for a, b in zip(real_shifts.FACE_SPLITS[split], real_shifts.FACE_SPLITS[other]):
                    assert not set(a) & set(b)
    with pytest.raises(ValueError, match="expected shift"):
        real_shifts.write_real_shift("mnist", "/nonexistent")


# ---------------------------------------------------------------------------------------------- the scores
def test_miou_and_confusions_against_a_loop():
    g = torch.Generator().manual_seed(0)
    k = 5
    logits = torch.randn(3, k, 4, 6, generator=g)
    labels = torch.randint(0, k, (3, 9, 13), generator=g)  # a non-integer resize ratio
    labels[0, :2] = 255
    labels[2] = 255  # an all-ignored image
    got = ts._confusions(logits, labels, k)
    up = torch.nn.functional.interpolate(logits.double(), size=(9, 13), mode="bilinear", align_corners=False)
    pred = up.argmax(1)
    want = np.zeros((3, k, k), np.int64)
    for i in range(3):
        for y in range(9):
            for x in range(13):
                if labels[i, y, x] != 255:
                    want[i, labels[i, y, x], pred[i, y, x]] += 1
    np.testing.assert_array_equal(got, want)
    total = want.sum(0)
    ious = []
    for c in range(k):
        union = total[c].sum() + total[:, c].sum() - total[c, c]
        if union:
            ious.append(total[c, c] / union)
    assert ts._miou(total) == pytest.approx(100 * sum(ious) / len(ious))


def test_dev_value_against_you_et_al():
    rng = np.random.default_rng(0)
    terms = [np.stack([w := rng.uniform(0.1, 3, n), w * rng.uniform(0, 2, n)]) for n in (5, 7, 4)]
    w = [v for t in terms for v in t[0]]
    wl = [v for t in terms for v in t[1]]
    n = len(w)
    mw, mwl = sum(w) / n, sum(wl) / n
    cov = sum((a - mwl) * (b - mw) for a, b in zip(wl, w)) / (n - 1)
    var = sum((b - mw) ** 2 for b in w) / (n - 1)
    eta = -cov / var
    risk = mwl + eta * mw - eta  # DEV (You et al. 2019, Algorithm 1)
    assert ts._dev_value(terms) == pytest.approx(-risk, rel=1e-12)


def test_bnm_against_numpy():
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(2, 4, 3, 5, generator=g).softmax(1)
    got = ts.bnm(probs)
    for i in range(2):
        matrix = probs[i].double().numpy().reshape(4, 15).T
        assert got[i] == pytest.approx(np.linalg.svd(matrix, compute_uv=False).sum() / 15, rel=1e-12)
    one_hot = torch.nn.functional.one_hot(torch.arange(4).repeat(4), 4).T.reshape(1, 4, 4, 4).float()
    assert ts.bnm(one_hot)[0] == pytest.approx(4 * 2 / 16)  # four classes of four pixels: singular values 2


def test_ami_bounds():
    labels = np.repeat(np.arange(4), 50)
    assert ts._ami([np.stack([labels, labels])]) == pytest.approx(1.0)
    assert ts._ami([np.stack([labels, (labels + 1) % 4])]) == pytest.approx(1.0)  # a renaming of the clusters
    rng = np.random.default_rng(0)
    assert abs(ts._ami([np.stack([labels, rng.permutation(labels)])])) < 0.05


def test_aggregates_resample_whole_images():
    confusions = np.zeros((2, 2, 2), np.int64)
    confusions[0] = [[5, 0], [0, 5]]  # a perfect image
    confusions[1] = [[0, 5], [5, 0]]  # an image all wrong
    assert ts._aggregate("source_miou", confusions, np.array([0, 0])) == 100.0
    assert ts._aggregate("source_miou", confusions, np.array([1, 1])) == 0.0
    agreement = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 4.0]])
    assert ts._aggregate("source_agreement", agreement, np.array([0, 2])) == pytest.approx(0.5)
    assert math.isnan(ts._aggregate("source_agreement", agreement, np.array([1])))
    assert ts._aggregate("bnm", np.array([0.1, 0.3]), np.array([1, 1, 0])) == pytest.approx(0.7 / 3)


# ---------------------------------------------------------------------------------------------- decisions
def _tree(values: dict[str, float], rounds: int, mious: dict[str, float] | None = None,
          tolerance: float = 0.0) -> dict:
    """A compact tree whose every score of model ``p`` is ``values[p]``, every tolerance ``tolerance``."""
    nodes = {}
    for p, v in values.items():
        nodes[p] = {"miou": (mious or {}).get(p, 0.0), "scores": {n: v for n in ts.SCORES}}
        if len(p) < rounds:
            nodes[p]["tolerance"] = {n: tolerance for n in ts.SCORES}
    return {"rounds": rounds, "nodes": nodes, "shift": "x", "seed": 0, "tolerance": "given"}


def test_compact_tolerance_is_the_paired_bootstrap_std():
    rng = np.random.default_rng(3)
    full = {"rounds": 1, "nodes": {}}
    reps = {p: rng.normal(size=6) for p in ("", "R", "F")}
    reps["R"][2] = math.nan  # a resample where the score is undefined is left out
    for p in ("", "R", "F"):
        full["nodes"][p] = {"miou": 1.0, "scores": {n: [float(p == "R"), *reps[p]] for n in ts.SCORES}}
    got = ts.compact(full)
    diffs = [a - b for a, b in zip(reps["R"], reps["F"]) if not math.isnan(a - b)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    assert got["nodes"][""]["tolerance"]["dev"] == pytest.approx(1.645 * sd)
    assert got["nodes"]["R"]["scores"]["dev"] == 1.0 and "tolerance" not in got["nodes"]["R"]
    assert ts.compact(got) is got


def test_decide_keeps_a_round_unless_the_fallback_beats_it_beyond_the_noise():
    assert ts.decide(_tree({"": 0, "R": 0.0, "F": 0.5}, 1, tolerance=0.3), "bnm") == "F"
    assert ts.decide(_tree({"": 0, "R": 0.0, "F": 0.3}, 1, tolerance=0.3), "bnm") == "R"  # within the noise
    assert ts.decide(_tree({"": 0, "R": 1.0, "F": 0.0}, 1), "bnm") == "R"
    assert ts.decide(_tree({"": 0, "R": math.nan, "F": 0.0}, 1), "bnm") == "R"
    two = {"": 0, "R": 0, "F": 1, "FR": 2, "FF": 1, "RR": 9, "RF": 9}
    assert ts.decide(_tree(two, 2), "dev") == "FR"  # from the kept child only


def test_the_pipelines_rule_compares_a_round_with_its_own_start():
    values = {"": 0.90, "R": 0.8985, "F": 0.99, "RR": 0.85, "RF": 0.0, "FR": 0.0, "FF": 0.5}
    tree = _tree(values, 2)
    # round 0 fell by 0.0015 < 0.003: kept although the fallback scores higher; round 1 fell by 0.0485: undone
    assert ts.decide_as_the_pipeline(tree) == "RF"
    assert ts.decide_as_the_pipeline(tree, tolerance=0.0) == "FF"
    assert ts.decide(tree, "flip_agreement") == "FF"  # against the fallback: F beats R both times


def test_arms_summary_and_leave_one_shift_out():
    mious = {"": 10.0, "R": 12.0, "F": 11.0, "RR": 14.0, "RF": 13.0, "FR": 15.0, "FF": 12.0}
    tree = _tree({p: 0.0 for p in mious}, 2, mious)  # every score ties: the rounds are kept, the paper's path
    arms = ts.arms(tree)
    assert (arms["source-only"], arms["control"], arms["paper"], arms["oracle"]) == (10.0, 12.0, 14.0, 15.0)
    assert all(arms[n] == 14.0 for n in ts.SCORES)
    margins = {"a": {"x": 1.0, "y": 2.0, "z": -1.0}, "b": {"x": 0.5, "y": 0.5, "z": 0.5}}
    table = {s: {"margin": {c: margins[c][s] for c in margins}} for s in ("x", "y", "z")}
    folds = {f["held_out"]: f for f in ts.loso(table, ("a", "b"))}
    # held out z: worst on x, y is a 1.0, b 0.5: a is chosen, and fails on z (-1)
    assert (folds["z"]["chosen"], folds["z"]["train_worst"], folds["z"]["held_margin"]) == ("a", 1.0, -1.0)
    assert not folds["z"]["passes"]
    for held in ("x", "y"):  # a's worst now includes z's -1: b is chosen and clears
        assert folds[held]["chosen"] == "b" and folds[held]["passes"]
    table["z"]["margin"]["a"] = 0.0  # a tie on the held-out floor clears
    assert all(f["passes"] for f in ts.loso(table, ("a", "b")))


def test_summary_rule_floor():
    trees = []
    for seed, (c, p) in enumerate(((10.0, 20.0), (12.0, 18.0))):
        mious = {"": 5.0, "R": 0.0, "F": 0.0, "RR": p, "RF": 0.0, "FR": 0.0, "FF": c}
        t = _tree({q: 0.0 for q in mious}, 2, mious)
        t.update(shift="digits", seed=seed)
        trees.append(t)
    entry = ts.summary(trees)["digits"]
    sd = math.sqrt(2.0)  # the sample std of (10, 12), and of (20, 18)
    assert entry["control"] == pytest.approx((11.0, sd)) and entry["paper"] == pytest.approx((19.0, sd))
    assert entry["floor"] == pytest.approx(19.0 - sd)
    assert entry["margin"]["bnm"] == pytest.approx(sd)  # every score keeps the rounds: the paper's mean


# ---------------------------------------------------------------------------------------------- the study
@pytest.mark.slow
def test_tree_trains_every_path_through_the_pipeline(tmp_path):
    result = ts.tree("faces", 0, tmp_path, rounds=2, rv_iters=2, bootstrap=4, source_iters=3, round_iters=2)
    assert sorted(result["nodes"]) == ["", "F", "FF", "FR", "R", "RF", "RR"]
    for node in result["nodes"].values():
        assert set(node["scores"]) == set(ts.SCORES)
        assert all(len(v) == 1 + 4 for v in node["scores"].values())
        assert 0 <= node["miou"] <= 100
    small = ts.compact(result)
    assert all(set(small["nodes"][p]["tolerance"]) == set(ts.SCORES) for p in ("", "R", "F"))
    assert ts.decide(small, "reverse") in {"RR", "RF", "FR", "FF"}
    assert result["nodes"]["F"]["scores"]["source_agreement"][0] <= 1.0
    assert result["heldout"] == ts.HELDOUT  # moved out of the source folder before stage 1
    assert len(gta5_files(tmp_path / "data" / "faces_seed0" / "gta5")) == 160 - ts.HELDOUT
    assert (tmp_path / "trees" / "faces_seed0.json").is_file()
    again = ts.tree("faces", 0, tmp_path, rounds=2, rv_iters=2, bootstrap=4)  # read from the cache
    assert again["nodes"] == json.loads(json.dumps(result))["nodes"]


FRESH = "benchmarks/results/issue35/seeds_3-5"  # the fresh-seed check: chose nothing


def _cached(folder: Path = RESULTS) -> list[dict]:
    return json.loads((folder / "results.json").read_text())["trees"]


def test_tables_regenerate_from_the_cache():
    assert ts.tables(_cached()) == (RESULTS / "results.md").read_text()
    fresh = ROOT / FRESH
    assert ts.tables(_cached(fresh), f" --seeds 3 4 5 --out {FRESH}", FRESH) == (fresh / "results.md").read_text()


@pytest.mark.parametrize("folder, seeds", [(RESULTS, (0, 1, 2)), (ROOT / FRESH, (3, 4, 5))])
def test_the_study_covers_every_shift_with_three_seeds(folder, seeds):
    trees = _cached(folder)
    assert {(t["shift"], t["seed"]) for t in trees} == {(s, seed) for s in ts.ALL_SHIFTS for seed in seeds}
    assert all(t["rounds"] == 3 and len(t["nodes"]) == 15 for t in trees)
    assert all(len(t["nodes"][p]["tolerance"]) == len(ts.SCORES) for t in trees for p in t["nodes"] if len(p) < 3)


def test_the_default_follows_the_study():
    """Decisions may be the default only if a score transfers (clears the rule on every shift, and the
    leave-one-shift-out choice clears it on every fold); otherwise the paper's behaviour stays."""
    table = ts.summary(_cached())
    transfers = [n for n in ts.NEW_SCORES if all(e["margin"][n] >= 0 for e in table.values())]
    folds_pass = all(f["passes"] for f in ts.loso(table))
    default = options.build_parser().get_default("round_decisions")
    assert default == ("score" if transfers and folds_pass else "off")


def _table_after(markdown: str, heading: str) -> str:
    lines = markdown[markdown.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def test_docs_show_the_cached_tables():
    """docs/examples.md carries the study's tables as results.md has them (issue 35: the tables and the script
    that regenerates them are in the docs)."""
    md = (RESULTS / "results.md").read_text()
    docs = (ROOT / "docs" / "examples.md").read_text()
    for heading in ("## Decisions on every shift", "## Margin over the rule's floor", "## Leave one shift out"):
        assert _table_after(md, heading) in docs
    fresh = (ROOT / FRESH / "results.md").read_text()
    for heading in ("## Mean over the shifts", "## Margin over the rule's floor"):
        assert _table_after(fresh, heading) in docs
    assert "python -m benchmarks.study.transfer_scores run --workers 2" in docs
