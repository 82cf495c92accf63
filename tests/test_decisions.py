"""``--round-decisions score`` (issue 27, an option since issue 34; uda.decisions): a round is kept only if the
label-free score did not fall; an undone round restores the round's start exactly and spends its budget again on
source-only steps; the best-scored model is delivered, and the same-budget control is selected by the same rule;
the decisions, what the delivered model contains and the last models are logged, in metrics.json and the last
line; resume stays exact and keeps the mode it was started with."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import train_gta2cs
from examples_helpers import (
    TINY_RUN,
    Crash,
    assert_same_state,
    build,
    crash_after,
    data_args,
    load_checkpoint,
    scripted_scores,
    train_with,
    write_fixture,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from uda import decisions, options, runtime

DECIDE = ["--round-decisions", "score", "--score-images", "3"]
TRAIN = Path(__file__).resolve().parents[1] / "examples" / "train_gta2cs.py"


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("decisions_data"))


def _run(roots, out: Path, extra: list[str], step_context=None):
    run = build([*data_args(*roots, out), *TINY_RUN, *extra])
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step_context=step_context)
    train_gta2cs.finish(run, state)
    return run, state


SCRIPT = {("begin_round", 0): 0.5, ("decide", 0): 0.4, ("end_fallback", 0): 0.6, ("decide", 1): 0.7}


# ---------------------------------------------------------------------------------------------- the default
def test_decisions_are_off_by_default_and_the_real_score_runs(roots, tmp_path):
    """Issue 34: the paper's behaviour is the default again; the real score still runs when asked for."""
    run = build([*data_args(*roots, tmp_path), *TINY_RUN])
    assert run.args.round_decisions == "off" and run.args.score_tolerance == 0.0
    run = build([*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE])
    assert run.args.round_score == "flip_agreement" and run.args.score_tolerance == options.SCORE_TOLERANCE
    state = train_gta2cs.start(run)
    value = decisions.score_model(run, state)
    assert 0.0 <= value <= 1.0 and run.model.training  # the flip agreement; the model back in training mode
    assert len(state["decisions"]["subset"]) == 3


def test_off_is_the_papers_behaviour(roots, tmp_path):
    """``--round-decisions off`` (the default): no score, no snapshot, the last round's model is delivered."""
    assert train_gta2cs.main([*data_args(*roots, tmp_path), *TINY_RUN, "--control"]) == 0
    assert not list(tmp_path.glob("round_start.pt")) and not list(tmp_path.glob("*best_scored*"))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "round_decisions" not in metrics and metrics["adapted"]["miou"] == metrics["rounds"][-1]["miou"]
    assert all(r["kept"] for r in metrics["rounds"])  # the kept flag, also without decisions
    log = (tmp_path / "log.txt").read_text().strip().splitlines()
    assert "label-free score" not in log[-1] and "delivered" not in log[-1]
    assert any(line.startswith("source-only trained for the same total iterations (6 + 8): ") for line in log)


# ---------------------------------------------------------------------------------------------- a round undone
def test_an_undone_round_restores_its_start_and_trains_source_only(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    seen = {}

    def watch(kind, checked):  # the model as the first step of each kind finds it
        if kind not in seen:
            seen[kind] = {k: v.clone() for k, v in run_ref[0].model.state_dict().items() if isinstance(v, torch.Tensor)}
        return contextlib.nullcontext()

    run_ref = [build([*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE, "--no-control"])]
    state = train_gta2cs.start(run_ref[0])
    train_gta2cs.train(run_ref[0], state, step_context=watch)
    train_gta2cs.finish(run_ref[0], state)
    source = load_checkpoint(tmp_path / "source_only.pt")["model"]
    # round 0 was undone: the fallback's first step starts from the round's start, i.e. the source model, bitwise
    for key, value in seen["fallback"].items():
        assert torch.equal(value, source[key]), key
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    record = metrics["round_decisions"]
    assert [(e["round"], e["kept"]) for e in record["rounds"]] == [(0, False), (1, True)]
    assert [r["kept"] for r in metrics["rounds"]] == [False, True] and "fallback_miou" in metrics["rounds"][0]
    assert record["rounds"][0]["fallback_score"] == 0.6 and record["best_from"] == "round 1"
    assert (record["start"], record["best"]) == (0.5, 0.7)
    assert record["best_contains"] == ["stage 1", "round 0 (source-only fallback)", "round 1"]
    log = (tmp_path / "log.txt").read_text()
    assert "round 0: undone (label-free score flip_agreement fell 0.5000 -> 0.4000, more than --score-tolerance 0.003)" in log
    assert "stage 2 round 0 (source-only fallback)" in log  # the fallback's log points
    assert "[12/18]" in log  # the ETA's total counts the undone round's budget: 6 + 2 x 4 + 4
    last = log.strip().splitlines()[-1]
    assert last.startswith("target mIoU: source-only ")
    assert ("(delivered: round 1 (stage 1 + round 0 (source-only fallback) + round 1: 6 + 2x4 iterations); kept "
            "rounds 1 of 2; label-free score flip_agreement 0.5000 -> 0.7000; the last model ") in last, last
    # the budget: stage 1 + round 0 (trained, then undone) + its fallback + round 1
    assert state["step"] == 6 + 4 + 4 + 4
    # the curves: the undone round is a marker of its own at the iterations in its model; the path goes on
    history = state["history"]
    assert history["undone_iter"] == [6 + 4] and history["eval_iter"] == [6, 6 + 4, 6 + 8]


def test_the_best_scored_model_is_delivered(roots, tmp_path, monkeypatch):
    """Round 0 is kept (0.5 -> 0.8); round 1 falls (0.8 -> 0.6) and is undone; its fallback scores 0.7, below
    round 0's model: adapted.pt is round 0's model, evaluated again as the adapted model; the last model is
    reported too."""
    script = {("begin_round", 0): 0.5, ("decide", 0): 0.8, ("decide", 1): 0.6, ("end_fallback", 1): 0.7}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(script))
    assert train_gta2cs.main([*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE, "--no-control"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    record = metrics["round_decisions"]
    assert record["best_from"] == "round 0" and record["best_file"] == f"best_scored-{6 + 4:08d}.pt"
    best = load_checkpoint(tmp_path / record["best_file"])
    assert best["from"] == "round 0"
    assert_same_state(best["model"], load_checkpoint(tmp_path / "adapted.pt")["model"], "model")
    # after the phase's checkpoint only the file the record names stays, and round_start.pt is gone
    assert sorted(p.name for p in tmp_path.glob("best_scored-*.pt")) == [record["best_file"]]
    assert not (tmp_path / "round_start.pt").exists()
    assert metrics["adapted_last"]["miou"] == metrics["rounds"][-1]["fallback_miou"]
    log = (tmp_path / "log.txt").read_text()
    last = log.strip().splitlines()[-1]
    assert "eval adapted (the best-scored model)" in log
    assert "(delivered: round 0 (stage 1 + round 0: 6 + 1x4 iterations); kept rounds 0 of 2;" in last, last
    assert last.endswith(f"; the last model {metrics['adapted_last']['miou']:.2f})")
    assert f"adapted {metrics['adapted']['miou']:.2f}" in last


def test_summary_names_the_delivered_model_and_the_kept_rounds():
    record = {"score": "flip_agreement", "start": 0.5, "best": 0.75, "best_from": "round 3", "delivered": None,
              "best_contains": ["stage 1", "round 0", "round 1", "round 2 (source-only fallback)", "round 3"],
              "rounds": [{"round": r, "kept": k} for r, k in enumerate([True, True, False, True, True])]}
    assert decisions.summary(record, 5, 100, 10) == (
        "delivered: round 3 (stage 1 + round 0 + round 1 + round 2 (source-only fallback) + round 3: 100 + 4x10 "
        "iterations); kept rounds 0-1, 3-4 of 5; label-free score flip_agreement 0.5000 -> 0.7500")
    record.update(rounds=[{"round": 0, "kept": False}], best_from="source model", best_contains=["stage 1"])
    assert decisions.summary(record, 1, 100, 10).startswith("delivered: source model (stage 1: 100 iterations); "
                                                            "kept no round of 1;")
    assert decisions.model_iterations(["stage 1", "round 0", "round 1 (static-label fallback)"], 100, 10) == 120


# ---------------------------------------------------------------------------------------------- the control
def test_the_control_gets_the_same_selection_and_its_own_stream(roots, tmp_path, monkeypatch):
    """With decisions and ``--control``: the control is scored at the same points (the source model's score is
    the adapted run's first), its best-scored model delivered and evaluated, its last model reported; its source
    batches do not depend on the adapted run's fallbacks."""
    control_scores = {("control_point", 0): 0.9, ("control_point", 1): 0.8}
    starts = {}

    def first_control_batch(name):
        def context(kind, checked):
            if kind == "control" and name not in starts:
                starts[name] = dict(runs[name].source_stream.state_dict())  # after the first control batch
            return contextlib.nullcontext()
        return context

    runs, states = {}, {}
    for name, script in (("undone", SCRIPT), ("kept", {("begin_round", 0): 0.5, ("decide", 0): 0.6,
                                                       ("decide", 1): 0.7})):
        monkeypatch.setattr(decisions, "score_model", scripted_scores({**script, **control_scores}))
        runs[name] = build([*data_args(*roots, tmp_path / name), *TINY_RUN, *DECIDE, "--control"])
        states[name] = train_gta2cs.start(runs[name])
        train_gta2cs.train(runs[name], states[name], step_context=first_control_batch(name))
        train_gta2cs.finish(runs[name], states[name])
    assert starts["undone"] == starts["kept"]  # the fallback drew 4 more source batches: not seen by the control
    stream, start = runs["kept"].source_stream, states["kept"]["stage2_source_stream"]
    absolute = start["epoch"] * stream.per_epoch + start["position"] + 2 * 4 + 1
    assert starts["kept"] == {"epoch": absolute // stream.per_epoch, "position": absolute % stream.per_epoch}

    out = tmp_path / "undone"
    metrics = json.loads((out / "metrics.json").read_text())
    control = metrics["round_decisions"]["control"]
    assert [s["score"] for s in control["scores"]] == [0.5, 0.9, 0.8]  # the source model's: the adapted run's
    assert control["best_from"] == "control round 0" and control["best_contains"] == ["stage 1", "control round 0"]
    delivered = load_checkpoint(out / control["best_file"])
    assert delivered["from"] == "control round 0"
    assert metrics["control_last"]["miou"] == control["scores"][-1]["miou"]
    assert states["undone"]["history"]["delivered_control_iter"] == [6 + 4]
    log = (out / "log.txt").read_text().strip().splitlines()
    budget = next(line for line in log if line.startswith("same-budget control: "))
    assert budget.startswith("same-budget control: source-only on the adapted run's schedule (6 + 2x4 iterations; "
                             "the adapted run spent 18, 1 undone round(s) spent again), selected by the same "
                             f"label-free score at the same points: {metrics['source_only_continued']['miou']:.2f} "
                             "(delivered: control round 0 (stage 1 + control round 0: 6 + 1x4 iterations); its last "
                             f"model {metrics['control_last']['miou']:.2f})"), budget
    assert not any("same total iterations" in line for line in log)
    assert "[22/26]" in "\n".join(log)  # the ETA: 6 + 2 x 2 x 4 + the undone round's 4


# ---------------------------------------------------------------------------------------------- the subset
def _paths(tree: dict[str, int], root: str = "/data/target") -> list[str]:
    return [f"{root}/{folder}/img_{i:03d}.png" for folder, n in tree.items() for i in range(n)]


def test_the_scoring_subset_spreads_over_cities_and_conditions():
    cities = _paths({"aachen": 30, "bochum": 10, "bremen": 20})
    picked = decisions.score_subset(cities, 6, seed=0)
    assert Counter(cities[i].split("/")[3] for i in picked) == {"aachen": 2, "bochum": 2, "bremen": 2}
    assert picked == decisions.score_subset(cities, 6, seed=0)  # seeded
    assert picked != decisions.score_subset(cities, 6, seed=1)
    # ACDC: condition / split / sequence; every condition, then every sequence within one
    acdc = _paths({f"{c}/train/GOPR{s}": 8 for c in ("fog", "night", "rain", "snow") for s in range(3)}, "/acdc/rgb_anon")
    picked = decisions.score_subset(acdc, 8, seed=3)
    assert set(Counter(acdc[i].split("/")[3] for i in picked).values()) == {2}  # /acdc/rgb_anon/<condition>
    assert all(n == 1 for n in Counter(tuple(acdc[i].split("/")[3:6]) for i in picked).values())
    # one folder (--target folder): spread over the sorted list, not its head
    flat = _paths({"train/images": 100}, "/mine")
    picked = sorted(decisions.score_subset(flat, 10, seed=0))
    assert max(b - a for a, b in zip([-1, *picked], [*picked, 100])) <= 20
    assert decisions.score_subset(flat[:4], 10, seed=0) == [0, 1, 2, 3]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=6), st.integers(1, 40), st.integers(0, 10**6))
def test_the_subset_is_balanced_over_folders(sizes, count, seed):
    """Any tree of one level: distinct images, and folder counts within one of each other where the folders
    have images left."""
    paths = _paths({f"city{j}": n for j, n in enumerate(sizes)})
    picked = decisions.score_subset(paths, count, seed)
    assert len(picked) == len(set(picked)) == min(count, len(paths))
    counts = Counter(paths[i].split("/")[3] for i in picked)
    full = {f"city{j}" for j, n in enumerate(sizes) if counts[f"city{j}"] < n}  # folders not used up
    if full:
        assert max(counts.values()) - min(counts[c] for c in full) <= 1


def test_the_subset_is_recorded_and_scoring_batches_are_sized_by_memory(roots, tmp_path, monkeypatch):
    # 1700 x 850 at K = 19: one image is about 330 MiB of score tensors, so 512 MiB scores one at a time
    assert decisions.score_batch_size(1700, 850, 19, 512) == 1
    assert decisions.score_batch_size(128, 64, 19, 512) == 512 * 2**20 // ((3 * 4 * 19 + 16) * 128 * 64)
    for w, h, k, mb in ((1700, 850, 19, 2048), (64, 32, 7, 1), (300, 100, 150, 64)):
        size = decisions.score_batch_size(w, h, k, mb)
        assert size == 1 or size * (3 * 4 * k + 16) * w * h <= mb * 2**20
    sizes = []
    real = decisions.scores.target_scores

    def spy(model, loader, *args, **kwargs):
        loader = list(loader)
        sizes.extend(b["image"].shape[0] for b in loader)
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(decisions.scores, "target_scores", spy)
    run = build([*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE, "--score-images", "5", "--score-memory-mb", "1"])
    state = train_gta2cs.start(run)
    decisions.score_model(run, state)
    per_image = (3 * 4 * 19 + 16) * 64 * 32  # the fixture's target images at --resize 32: 64 x 32
    assert sizes and max(sizes) == min(5, 2**20 // per_image) and sum(sizes) == 5
    assert state["decisions"]["subset"] == [run.target_train[i].name for i in
                                            decisions.score_subset([s.image for s in run.target_train], 5, 0)]


# ---------------------------------------------------------------------------------------------- resume
def test_decisions_resume_exactly_and_keep_their_mode(roots, tmp_path, monkeypatch):
    """Stopped inside the undone round's fallback and resumed WITHOUT the decision options: the run keeps the
    mode it was started with, bitwise the uninterrupted run."""
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    extra = [*TINY_RUN, *DECIDE, "--no-control"]
    assert train_gta2cs.main([*data_args(*roots, tmp_path / "full"), *extra]) == 0
    base = [*data_args(*roots, tmp_path / "cut"), *extra]
    assert train_with(base, crash_after(6 + 4 + 3)) == 1  # stage 1, round 0, 3 steps of its fallback
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["fallback"] and (ckpt["round"], ckpt["iteration"]) == (0, 2)
    plain = [*data_args(*roots, tmp_path / "cut"), *TINY_RUN, "--no-control", "--resume", "auto"]
    assert train_gta2cs.main(plain) == 0
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("model", "contrast", "optimizer", "streams", "decisions"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])
    log = (tmp_path / "cut" / "log.txt").read_text()
    assert ("resumed with the checkpoint's round-decision settings (give them to change them): --round-decisions "
            "score, --score-tolerance 0.003, --score-images 3") in log


def test_a_changed_round_score_on_resume_is_refused(roots, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    base = [*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE, "--no-control"]
    assert train_with(base, crash_after(6 + 3)) == 1  # checkpoint: round 0, iteration 2, after its start was scored
    capsys.readouterr()
    assert train_gta2cs.main([*base, "--round-score", "neg_entropy", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "expected --round-score flip_agreement (the score this run has compared its rounds with), got " \
           "--round-score neg_entropy" in err


def test_the_delivered_file_is_the_one_the_record_names(roots, tmp_path, monkeypatch):
    """A hard kill after round 1's best-scored model was written but before the checkpoint that names it; the
    resumed run decides round 1 otherwise (undone): it delivers round 0's model, not the killed attempt's file."""
    first = {("begin_round", 0): 0.5, ("decide", 0): 0.8, ("decide", 1): 0.9}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(first))
    base = [*data_args(*roots, tmp_path), *TINY_RUN, *DECIDE, "--no-control"]

    real = train_gta2cs.save_model

    def killed(run, name, **extra):
        if name == "adapted.pt":
            raise Crash("killed before adapted.pt and the checkpoint")
        return real(run, name, **extra)

    monkeypatch.setattr(train_gta2cs, "save_model", killed)
    run = build(base)
    state = train_gta2cs.start(run)
    with pytest.raises(Crash):
        train_gta2cs.train(run, state)
    stale = tmp_path / f"best_scored-{6 + 8:08d}.pt"
    killed_attempt = load_checkpoint(stale)
    assert killed_attempt["from"] == "round 1"  # written by the killed attempt; no checkpoint names it
    monkeypatch.undo()
    second = {**first, ("decide", 1): 0.6, ("end_fallback", 1): 0.7}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(second))
    assert train_gta2cs.main([*base, "--resume", "auto"]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())["round_decisions"]
    assert record["best_from"] == "round 0"
    delivered = load_checkpoint(tmp_path / record["best_file"])
    assert delivered["from"] == "round 0"
    adapted = load_checkpoint(tmp_path / "adapted.pt")["model"]
    assert_same_state(delivered["model"], adapted, "model")
    with pytest.raises(AssertionError):  # the killed attempt's round-1 model is another model
        assert_same_state(killed_attempt["model"], adapted)
    assert not stale.exists()  # removed after the phase's checkpoint (decisions.tidy)
    # a file that is not the one the record names is refused, naming why
    run = build([*base, "--resume", "auto"])
    state = train_gta2cs.start(run)
    torch.save({"model": run.model.state_dict(), "from": "round 1", "step": 99}, tmp_path / record["best_file"])
    with pytest.raises(ValueError, match="does not belong to this checkpoint"):
        decisions.deliver(run, {**state, "decisions": record})


# ---------------------------------------------------------------------------------------------- disk
def test_the_disk_estimate_counts_every_file_a_run_writes(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT, default=0.5))
    run, _ = _run(roots, tmp_path, [*DECIDE, "--control"])
    model = runtime.tensor_bytes(run.model.state_dict())
    state = 2 * model + runtime.tensor_bytes(run.contrast.state_dict())
    files = runtime.output_files(model, state, rounds=2, decisions=True, control=True, pseudo_labels=6,
                                 pseudo_label_pixels=64 * 32)
    patterns = [p for key in files for p in key.split()]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    for path in written:
        rel = path.relative_to(tmp_path).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not in the disk estimate"
    for name in ("best_scored-*.pt", "control_best_scored-*.pt"):  # the delivered ones; round_start.pt: removed
        assert len(list(tmp_path.glob(name))) == 1, name
    assert sum(p.stat().st_size for p in written) <= sum(files.values())


def test_batches_keep_order_and_never_stack_different_sizes():
    sizes = [(8, 16), (8, 16), (8, 12), (8, 12), (8, 12), (8, 16)]
    data = [{"image": torch.full((3, *s), float(i))} for i, s in enumerate(sizes)]
    got = list(decisions.batches(data, size=2))
    assert [tuple(b["image"].shape) for b in got] == [(2, 3, 8, 16), (2, 3, 8, 12), (1, 3, 8, 12), (1, 3, 8, 16)]
    assert [int(v) for b in got for v in b["image"][:, 0, 0, 0]] == list(range(6))


# ---------------------------------------------------------------------------------------------- resume, CLI
STOP_RUN = ["--source-iters", "40", "--rounds", "2", "--round-iters", "30", "--batch-size", "2", "--crop", "32",
            "--resize", "32", "--eval-size", "64x32", "--log-every", "5", "--ckpt-every", "1000", "--workers", "0",
            "--threads", "1", "--resume", "auto"]


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_a_mid_round_resume_of_a_run_without_decisions_finishes(roots, tmp_path):
    """Issue 34: a run made without decisions (the default now, and every run before issue 27), or by a version
    without them at all, stopped by SIGTERM in the middle of a round, resumes with ``--resume auto`` and
    finishes: in its own mode, or with ``--round-decisions score`` (the interrupted round is kept without a
    decision: its start was never scored)."""
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(TRAIN), *data_args(*roots, stopped), *STOP_RUN],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    for line in proc.stdout:
        if "stage 2 round 0 it 10 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, err
    assert load_checkpoint(stopped / "checkpoint.pt")["phase"] == "adapt"
    older = tmp_path / "older"  # what a version before round decisions wrote: none of their keys
    shutil.copytree(stopped, older)
    ckpt = load_checkpoint(older / "checkpoint.pt")
    for key in ("fallback", "decisions", "stage2_source_stream"):
        ckpt.pop(key)
    for key in options.DECISION_OPTIONS:
        ckpt["config"].pop(key)
    torch.save(ckpt, older / "checkpoint.pt")
    for source in (stopped, older):
        for name, extra in (("same", []), ("score", ["--round-decisions", "score", "--score-images", "2"])):
            out = tmp_path / f"{source.name}_{name}"
            shutil.copytree(source, out)
            result = _cli([*data_args(*roots, out), *STOP_RUN, *extra])
            assert result.returncode == 0, (source.name, name, result.stderr[-2000:])
            metrics = json.loads((out / "metrics.json").read_text())
            assert [r["round"] for r in metrics["rounds"]] == [0, 1]
            if name == "same":
                assert "round_decisions" not in metrics
                continue
            record = metrics["round_decisions"]
            assert record["rounds"][0]["score_before"] is None and record["rounds"][0]["kept"]
            assert record["rounds"][1]["score_before"] == record["rounds"][0]["score_after"]
            assert "round 0: kept without a decision" in result.stdout
