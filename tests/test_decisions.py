"""``--round-decisions score`` (issue 27, uda.decisions): a round is kept only if the label-free score did not fall;
an undone round restores the round's start exactly and spends its budget on source-only steps; the best-scored
model is delivered; the decisions are logged, in metrics.json and the last line; resume stays exact."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import train_gta2cs
from examples_helpers import (
    TINY_RUN,
    assert_same_state,
    build,
    crash_after,
    data_args,
    load_checkpoint,
    scripted_scores,
    train_with,
    write_fixture,
)
from uda import decisions

DECIDE = ["--round-decisions", "score", "--score-images", "3"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("decisions_data"))




SCRIPT = {("begin_round", 0): 0.5, ("decide", 0): 0.4, ("end_fallback", 0): 0.6, ("decide", 1): 0.7}


def test_an_undone_round_restores_its_start_and_trains_source_only(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, *DECIDE, "--no-control"])
    seen = {}

    def watch(kind, checked):  # the model as the first step of each kind finds it
        if kind not in seen:
            seen[kind] = {k: v.clone() for k, v in run.model.state_dict().items() if isinstance(v, torch.Tensor)}
        return contextlib.nullcontext()

    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step_context=watch)
    train_gta2cs.finish(run, state)
    source = load_checkpoint(tmp_path / "source_only.pt")["model"]
    # round 0 was undone: the fallback's first step starts from the round's start, i.e. the source model, bitwise
    for key, value in seen["fallback"].items():
        assert torch.equal(value, source[key]), key
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    record = metrics["round_decisions"]
    assert [(e["round"], e["kept"]) for e in record["rounds"]] == [(0, False), (1, True)]
    assert record["rounds"][0]["fallback_score"] == 0.6 and record["best_from"] == "round 1"
    assert (record["start"], record["best"]) == (0.5, 0.7)
    log = (tmp_path / "log.txt").read_text()
    assert "round 0: undone (label-free score flip_agreement fell 0.5000 -> 0.4000, more than --score-tolerance 0.003)" in log
    assert "stage 2 round 0 (source-only fallback)" in log  # the fallback's log points
    last = log.strip().splitlines()[-1]
    assert last.endswith("(kept rounds 1 of 2; label-free score flip_agreement 0.5000 -> 0.7000 "
                         "(delivered: round 1))"), last
    assert last.startswith("target mIoU: source-only ")
    # the budget: stage 1 + round 0 (trained, then undone) + its fallback + round 1
    assert state["step"] == 6 + 4 + 4 + 4


def test_the_best_scored_model_is_delivered(roots, tmp_path, monkeypatch):
    """Round 0 is kept (0.5 -> 0.8); round 1 falls (0.8 -> 0.6) and is undone; its fallback scores 0.7, below
    round 0's model: adapted.pt is round 0's model (best_scored.pt), evaluated again as the adapted model."""
    script = {("begin_round", 0): 0.5, ("decide", 0): 0.8, ("decide", 1): 0.6, ("end_fallback", 1): 0.7}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(script))
    gta, cs = roots
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path), *TINY_RUN, *DECIDE, "--no-control"]) == 0
    best = load_checkpoint(tmp_path / "best_scored.pt")
    adapted = load_checkpoint(tmp_path / "adapted.pt")
    assert best["round"] == "round 0"
    assert_same_state(best["model"], adapted["model"], "model")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["round_decisions"]["best_from"] == "round 0"
    log = (tmp_path / "log.txt").read_text()
    assert "eval adapted (the best-scored model)" in log and "(delivered: round 0)" in log


def test_decisions_resume_exactly(roots, tmp_path, monkeypatch):
    """Stopped inside the undone round's fallback and resumed: bitwise the uninterrupted run."""
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    gta, cs = roots
    extra = [*TINY_RUN, *DECIDE, "--no-control"]
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path / "full"), *extra]) == 0
    base = [*data_args(gta, cs, tmp_path / "cut"), *extra]
    assert train_with(base, crash_after(6 + 4 + 3)) == 1  # stage 1, round 0, 3 steps of its fallback
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["fallback"] and (ckpt["round"], ckpt["iteration"]) == (0, 2)
    assert train_gta2cs.main(base + ["--resume", "auto"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("model", "contrast", "optimizer", "streams", "decisions"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])


def test_the_real_score_runs_and_decisions_are_on_by_default(roots, tmp_path):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN])
    assert run.args.round_decisions == "score" and run.args.round_score == "flip_agreement"
    value = decisions.score_model(run)
    assert 0.0 <= value <= 1.0 and run.model.training  # the flip agreement; the model back in training mode


def test_off_is_the_papers_behaviour(roots, tmp_path):
    """``--round-decisions off``: no score, no snapshot, the last round's model is delivered."""
    gta, cs = roots
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path), *TINY_RUN, "--round-decisions", "off"]) == 0
    assert not (tmp_path / "round_start.pt").exists() and not (tmp_path / "best_scored.pt").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "round_decisions" not in metrics and metrics["adapted"]["miou"] == metrics["rounds"][-1]["miou"]
    assert "label-free score" not in (tmp_path / "log.txt").read_text().strip().splitlines()[-1]


def test_summary_names_the_kept_rounds():
    record = {"score": "flip_agreement", "start": 0.5, "best": 0.75, "best_from": "round 3",
              "rounds": [{"round": r, "kept": k} for r, k in enumerate([True, True, False, True, True])]}
    assert decisions.summary(record, 5) == ("kept rounds 0-1, 3-4 of 5; label-free score flip_agreement 0.5000 -> "
                                            "0.7500 (delivered: round 3)")
    record["rounds"] = [{"round": 0, "kept": False}]
    assert decisions.summary(record, 1).startswith("kept no round of 1;")


def test_batches_keep_order_and_never_stack_different_sizes():
    sizes = [(8, 16), (8, 16), (8, 12), (8, 12), (8, 12), (8, 16)]
    data = [{"image": torch.full((3, *s), float(i))} for i, s in enumerate(sizes)]
    got = list(decisions.batches(data, size=2))
    assert [tuple(b["image"].shape) for b in got] == [(2, 3, 8, 16), (2, 3, 8, 12), (1, 3, 8, 12), (1, 3, 8, 16)]
    assert [int(v) for b in got for v in b["image"][:, 0, 0, 0]] == list(range(6))
