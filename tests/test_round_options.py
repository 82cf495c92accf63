"""Issue 27's round options (all opt-in): ``--score-tolerance``, ``--fallback {static,drop-flagged}``,
``--reliability-weight``, ``--proto-resize purity``, ``--rectify`` (uda.decisions, uda.reliability, the loop).

Each is checked against an independent reference: scripted score sequences for the decisions, plain loops over
pixels and classes for the weights and the rectification, protocl's own ``PrototypeEMA.update(resize=...)`` for
the purity prototypes; and a resumed run equals the uninterrupted one bitwise."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
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
from uda import decisions, options, reliability, signals

import protocl
from protocl import IGNORE_INDEX

DECIDE = ["--round-decisions", "score", "--score-images", "3", "--no-control"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("round_options_data"))




# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("argv, message", [
    (["--score-tolerance", "-0.1"], "--score-tolerance >= 0"),
    (["--score-tolerance", "nan"], "--score-tolerance >= 0"),
    (["--round-decisions", "off", "--score-tolerance", "0.01"], "--round-decisions off"),
    (["--round-decisions", "off", "--fallback", "static"], "--round-decisions off"),
    (["--no-signals", "--reliability-weight"], "--reliability-weight reads the label-free signals"),
    (["--fallback", "static"], "--round-decisions off is in force \\(the default"),
    (["--round-decisions", "score", "--no-signals", "--fallback", "drop-flagged"], "--fallback drop-flagged reads"),
    (["--rectify", "--no-dynamic"], "--rectify replaces the dynamic labels, but --no-dynamic"),
    (["--rectify", "--target-ce", "margin"], "but --target-ce margin"),
])
def test_bad_combinations_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        options.parse_args(argv)


def test_defaults():
    # issue 34: decisions are off by default (the paper's behaviour); with them on, the tolerance is the default
    a = options.parse_args([])
    assert (a.round_decisions, a.score_tolerance, a.fallback, a.reliability_weight, a.proto_resize, a.rectify) == (
        "off", 0.0, "source", False, "nearest", False)
    assert options.SCORE_TOLERANCE == 0.003
    assert options.parse_args(["--round-decisions", "score"]).score_tolerance == options.SCORE_TOLERANCE
    score = ["--round-decisions", "score", "--score-tolerance", "0"]
    assert options.parse_args(score).score_tolerance == 0.0  # any fall undoes a round
    assert options.parse_args(score).given == ["round_decisions", "score_tolerance"]  # what the command line gave
    assert "given" not in options.config_dict(options.parse_args(score))


# ------------------------------------------------------------------------------------------ tolerance
@pytest.mark.parametrize("tolerance, kept, best_from, delivered", [
    # 0.47 < 0.50: undone; its fallback scores 0.46; round 1's 0.48 >= 0.46: kept; neither reaches the source's 0.50
    (0.0, [(0, False), (1, True)], "source model", 0.50),
    # 0.47 >= 0.50 - 0.05: kept, and within 0.05 of the best (0.50): delivered; then 0.48: kept and delivered
    (0.05, [(0, True), (1, True)], "round 1", 0.48),
])
def test_tolerance_against_a_scripted_score_sequence(roots, tmp_path, monkeypatch, tolerance, kept, best_from,
                                                      delivered):
    script = {("begin_round", 0): 0.50, ("decide", 0): 0.47, ("end_fallback", 0): 0.46, ("decide", 1): 0.48}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(script))
    gta, cs = roots
    argv = [*data_args(gta, cs, tmp_path), *TINY_RUN, *DECIDE, "--score-tolerance", str(tolerance)]
    assert train_gta2cs.main(argv) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())["round_decisions"]
    assert [(e["round"], e["kept"]) for e in record["rounds"]] == kept
    assert (record["best_from"], record["delivered"]) == (best_from, delivered)
    assert record["best"] == 0.50  # the best score seen: the source model's


def test_tolerance_delivers_the_latest_model_within_it_not_a_drifting_one(roots, tmp_path, monkeypatch):
    """Scores 0.50 -> 0.48 (kept, within 0.03 of the best 0.50: delivered) -> 0.46 (kept against 0.48, but 0.04
    below the best: not delivered). The delivered model is round 0's, the last one within the tolerance of 0.50."""
    script = {("begin_round", 0): 0.50, ("decide", 0): 0.48, ("decide", 1): 0.46}
    monkeypatch.setattr(decisions, "score_model", scripted_scores(script))
    gta, cs = roots
    out = tmp_path / "run"
    assert train_gta2cs.main([*data_args(gta, cs, out), *TINY_RUN, *DECIDE, "--score-tolerance", "0.03"]) == 0
    record = json.loads((out / "metrics.json").read_text())["round_decisions"]
    assert [e["kept"] for e in record["rounds"]] == [True, True]
    assert (record["best"], record["best_from"], record["delivered"]) == (0.50, "round 0", 0.48)
    assert_same_state(load_checkpoint(out / record["best_file"])["model"],
                      load_checkpoint(out / "adapted.pt")["model"])
    last = (out / "log.txt").read_text().strip().splitlines()[-1]
    assert "(delivered: round 0 (stage 1 + round 0: 6 + 1x4 iterations); kept rounds 0-1 of 2; label-free score " \
           "flip_agreement 0.5000 -> 0.4800; the last model " in last, last


# ------------------------------------------------------------------------------------------ fallbacks
SCRIPT = {("begin_round", 0): 0.5, ("decide", 0): 0.4, ("end_fallback", 0): 0.6, ("decide", 1): 0.7}


def test_static_fallback_trains_on_the_rounds_static_labels_only(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, *DECIDE, "--fallback", "static"])
    seen, labels_seen = {}, []
    original = train_gta2cs.adapt_step

    def recording_step(run_, src, tgt, **kwargs):
        stats, labels = original(run_, src, tgt, **kwargs)
        labels_seen.append((run_.contrast.dynamic, labels))
        return stats, labels

    monkeypatch.setattr(train_gta2cs, "adapt_step", recording_step)  # what fallback_round steps with

    def watch(kind, checked):
        seen.setdefault(kind, (run.contrast.dynamic, run.contrast.fcl_weight, run.contrast.bcl_weight))
        return contextlib.nullcontext()

    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step_context=watch)
    assert seen["fallback"] == (False, 0.0, 0.0)  # no dynamic labels, no FCL/BCL during the fallback
    assert seen["adapt"] == (True, 0.1, 0.1) and (run.contrast.dynamic, run.contrast.fcl_weight) == (True, 0.1)
    fallback = [labels for dynamic, labels in labels_seen if not dynamic]
    assert len(fallback) == 4  # the round's budget, with target batches
    for labels in fallback:  # the target CE trained on the static labels themselves
        assert torch.equal(labels["hybrid"], labels["static"])
        assert bool((labels["dynamic"] == IGNORE_INDEX).all())
    log = (tmp_path / "log.txt").read_text()
    assert "stage 2 round 0 (static-label fallback)" in log and "static-label fallback done" in log
    record = state["decisions"]
    assert record["rounds"][0]["fallback"] == "static"


def test_drop_flagged_fallback_weighs_the_flagged_classes_zero(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, *DECIDE, "--fallback", "drop-flagged"])
    weights_seen = []
    original = train_gta2cs.adapt_step

    def recording_step(run_, src, tgt, **kwargs):
        weights_seen.append(kwargs.get("class_weight"))
        return original(run_, src, tgt, **kwargs)

    monkeypatch.setattr(train_gta2cs, "adapt_step", recording_step)
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state)
    agreement = state["metrics"]["signals"][0]["static_agreement"]  # the undone round's signals
    expected = [0.0 if (v is not None and not math.isnan(v) and v < 0.5) else 1.0 for v in agreement]
    assert len(weights_seen) == 4 and all(w is not None and w.tolist() == expected for w in weights_seen)
    assert "drop-flagged fallback" in (tmp_path / "log.txt").read_text()


def test_flagged_weights_by_a_plain_rule():
    agreement = [0.9, 0.3, math.nan, None, 0.5, 0.49]
    assert reliability.flagged_weights(agreement).tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------ reliability
def test_class_weights_against_counted_agreement():
    torch.manual_seed(0)
    K, B, H, W = 4, 2, 8, 8
    static = torch.randint(0, K + 1, (B, H, W))
    static[static == K] = IGNORE_INDEX
    dynamic = torch.randint(0, K + 1, (B, H, W))
    dynamic[dynamic == K] = IGNORE_INDEX
    sims = signals.Similarities(torch.randn(B, K, 2, 2), torch.ones(B, K, dtype=torch.bool))
    counts = signals.step_counts(static, dynamic, dynamic, static.clamp(max=K - 1), sims, 0.5, K)
    got = reliability.class_weights(counts)
    for c in range(K):  # a plain loop over pixels
        overlap = agree = 0
        for b in range(B):
            for i in range(H):
                for j in range(W):
                    if dynamic[b, i, j] == c and static[b, i, j] != IGNORE_INDEX:
                        overlap += 1
                        agree += int(static[b, i, j] == c)
        assert got[c].item() == pytest.approx((agree + 1) / (overlap + 1))
    with pytest.raises(ValueError, match="counts: expected shape"):
        reliability.class_weights(torch.zeros(3, K))


def test_class_weighted_cross_entropy_against_a_loop():
    torch.manual_seed(1)
    K = 3
    logits = torch.randn(2, K, 3, 4, dtype=torch.float64)
    labels = torch.randint(0, K, (2, 3, 4))
    labels[0, 0, :2] = IGNORE_INDEX
    weight = torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64)
    num = den = 0.0
    for b in range(2):
        for i in range(3):
            for j in range(4):
                y = int(labels[b, i, j])
                if y == IGNORE_INDEX:
                    continue
                logp = logits[b, :, i, j] - torch.logsumexp(logits[b, :, i, j], 0)
                num += float(-logp[y] * weight[y])
                den += float(weight[y])
    assert reliability.safe_cross_entropy(logits, labels, weight).item() == pytest.approx(num / den)
    plain = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)
    assert reliability.safe_cross_entropy(logits, labels).item() == pytest.approx(plain.item())
    empty = reliability.safe_cross_entropy(logits, torch.full_like(labels, IGNORE_INDEX), weight)
    assert empty.item() == 0.0 and empty.requires_grad is False  # (logits without grad here); finite, not NaN


def test_reliability_weights_reach_the_step(roots, tmp_path, monkeypatch):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--round-decisions", "off", "--reliability-weight"])
    seen = []
    original = train_gta2cs.adapt_step

    def recording_step(run_, src, tgt, **kwargs):
        seen.append((kwargs["class_weight"].clone(), state["signal_counts"].clone()))
        return original(run_, src, tgt, **kwargs)

    state = train_gta2cs.start(run)
    train_gta2cs.train_source(run, state)
    train_gta2cs.end_source(run, state)
    state["thresholds"] = train_gta2cs.make_static_labels(run, 0)
    train_gta2cs.adapt_round(run, state, step=recording_step, until=3)
    assert torch.equal(seen[0][0], torch.ones(run.num_classes))  # no evidence yet: every class weighs 1
    for weight, counts in seen:  # the round so far: (agree + 1) / (overlap + 1)
        overlap, agree = counts[signals.ROWS.index("overlap")], counts[signals.ROWS.index("agree")]
        assert torch.allclose(weight, ((agree + 1) / (overlap + 1)).float())
    assert not torch.equal(seen[-1][1], seen[0][1])  # the counts moved between steps


# ------------------------------------------------------------------------------------------ purity
def test_purity_prototypes_are_protocls_purity_pooling(roots, tmp_path):
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--proto-resize", "purity"])
    K, D = run.num_classes, run.model.feature_dim
    torch.manual_seed(2)
    f_s, f_t = torch.randn(2, D, 4, 4), torch.randn(2, D, 4, 4)
    y_s = torch.randint(0, 3, (2, 16, 16))  # random labels: most 4x4 cells are mixed
    y_f = torch.full((2, 16, 16), IGNORE_INDEX)
    run.contrast.train()
    run.contrast(f_s, y_s, f_t, y_f)
    expected = {}
    for resize in ("purity", "nearest"):
        ema = protocl.PrototypeEMA(K, D, momentum=run.contrast.source_ema.momentum, sync=False)
        ema.update(f_s, y_s, resize=resize)
        expected[resize] = ema.prototypes
    assert torch.allclose(run.contrast.source_ema.prototypes, expected["purity"], atol=1e-6)
    assert not torch.allclose(expected["purity"], expected["nearest"], atol=1e-3)  # the test can tell them apart


# ------------------------------------------------------------------------------------------ rectify
def _reference_rectify(probs, features, prototypes, initialized, tau, static, threshold):
    """ProDA's rectification, one pixel at a time (same grid for features and labels)."""
    B, K, H, W = probs.shape
    out = torch.full((B, H, W), IGNORE_INDEX, dtype=torch.long)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                f = features[b, :, i, j]
                cos = [float(torch.dot(f, prototypes[k]) / (f.norm() * prototypes[k].norm())) for k in range(K)]
                exps = [math.exp(cos[k] / tau) if initialized[k] else 0.0 for k in range(K)]
                if not any(initialized):
                    exps = [1.0] * K
                omega = [e / sum(exps) for e in exps]
                q = [omega[k] * float(probs[b, k, i, j]) for k in range(K)]
                q = [v / sum(q) for v in q]
                best = max(range(K), key=lambda k: q[k])
                if static[b, i, j] != IGNORE_INDEX or q[best] >= threshold:
                    out[b, i, j] = best
    return out


@pytest.mark.parametrize("initialized", [[True, True, False, True], [False] * 4])
def test_rectify_against_a_loop_over_pixels(initialized):
    torch.manual_seed(3)
    B, K, D, H, W = 2, 4, 5, 5, 6
    probs = torch.softmax(3 * torch.randn(B, K, H, W, dtype=torch.float64), 1)
    features = torch.randn(B, D, H, W, dtype=torch.float64)
    prototypes = torch.randn(K, D, dtype=torch.float64)
    init = torch.tensor(initialized)
    static = torch.randint(0, K, (B, H, W))
    static[:, ::2] = IGNORE_INDEX
    weights = reliability.prototype_weights(features, prototypes, init, 0.1)
    got = reliability.rectify(probs, weights, static, 0.6)
    ref = _reference_rectify(probs, features, prototypes, initialized, 0.1, static, 0.6)
    assert torch.equal(got, ref)
    assert bool((got == IGNORE_INDEX).any()) and bool((got != IGNORE_INDEX).any())  # both branches taken
    if not any(initialized):  # no prototype: the static model's own arg max
        assert torch.equal(got[static != IGNORE_INDEX], probs.argmax(1)[static != IGNORE_INDEX])


def test_rectify_validates_its_inputs():
    with pytest.raises(ValueError, match="temperature: expected > 0"):
        reliability.prototype_weights(torch.randn(1, 2, 3, 3), torch.randn(4, 2), torch.ones(4, dtype=torch.bool), 0)
    with pytest.raises(ValueError, match="features, prototypes"):
        reliability.prototype_weights(torch.randn(1, 2, 3, 3), torch.randn(4, 3), torch.ones(4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="probabilities, weights, static"):
        reliability.rectify(torch.rand(1, 4, 6, 6), torch.rand(1, 3, 3, 3), torch.zeros(1, 6, 6, dtype=torch.long), 0.5)


def test_rectify_in_the_step_uses_the_rounds_start_model(roots, tmp_path, monkeypatch):
    """The teacher is the model at the round's start (the static labels' model), frozen; the orchestrator runs
    without its own dynamic labels and trains on the rectified ones."""
    gta, cs = roots
    run = build([*data_args(gta, cs, tmp_path), *TINY_RUN, "--round-decisions", "off", "--rectify"])
    assert run.contrast.dynamic is False and run.teacher is not None and not run.teacher.training
    state = train_gta2cs.start(run)
    train_gta2cs.train_source(run, state)
    train_gta2cs.end_source(run, state)
    start = copy.deepcopy(run.model.state_dict())
    state["thresholds"] = train_gta2cs.make_static_labels(run, 0)
    seen = []

    def recording_step(run_, src, tgt, **kwargs):
        stats, labels = train_gta2cs.adapt_step(run_, src, tgt, **kwargs)
        seen.append(labels)
        return stats, labels

    train_gta2cs.adapt_round(run, state, step=recording_step, until=3)
    assert_same_state(start, run.teacher.state_dict(), "teacher")  # frozen at the round's start
    for labels in seen:  # the hybrid labels are the rectified ones; every static pixel keeps a label
        assert torch.equal(labels["hybrid"], labels["dynamic"])
        assert bool((labels["hybrid"][labels["static"] != IGNORE_INDEX] != IGNORE_INDEX).all())


# ------------------------------------------------------------------------------------------ resume
def test_reliability_and_rectify_resume_exactly(roots, tmp_path):
    gta, cs = roots
    extra = [*TINY_RUN, "--round-decisions", "off", "--no-control", "--reliability-weight", "--rectify",
             "--proto-resize", "purity"]
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path / "full"), *extra]) == 0
    base = [*data_args(gta, cs, tmp_path / "cut"), *extra]
    assert train_with(base, crash_after(6 + 3)) == 1  # stage 1, then 3 steps of round 0 (saved after 2)
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert (ckpt["phase"], ckpt["round"], ckpt["iteration"]) == ("adapt", 0, 2) and "teacher" in ckpt
    assert train_gta2cs.main(base + ["--resume", "auto"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("model", "contrast", "optimizer", "streams", "teacher", "signal_counts"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])


def test_fallback_static_resumes_exactly(roots, tmp_path, monkeypatch):
    monkeypatch.setattr(decisions, "score_model", scripted_scores(SCRIPT))
    gta, cs = roots
    extra = [*TINY_RUN, *DECIDE, "--fallback", "static"]
    assert train_gta2cs.main([*data_args(gta, cs, tmp_path / "full"), *extra]) == 0
    base = [*data_args(gta, cs, tmp_path / "cut"), *extra]
    assert train_with(base, crash_after(6 + 4 + 3)) == 1  # inside the undone round's fallback
    ckpt = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert ckpt["fallback"] and (ckpt["round"], ckpt["iteration"]) == (0, 2)
    assert train_gta2cs.main(base + ["--resume", "auto"]) == 0
    a, b = load_checkpoint(tmp_path / "full" / "checkpoint.pt"), load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    for key in ("model", "contrast", "optimizer", "streams", "decisions"):
        assert_same_state(a[key], b[key], key)
    assert json.dumps(a["metrics"]) == json.dumps(b["metrics"])
