"""examples/train_daformer.py --contrast (issue 33): protocl's contrast as an add-on to the DAFormer-class recipe,
on tiny fixture data: the static labels against a float64 loop, the recipe unchanged before --contrast-start and
its maths unchanged by the single backward, the hybrid labels in the target CE, no host read, an exact resume,
bf16, SePiCo's projection head, the refusals."""

from __future__ import annotations

import copy
import json

import protocl
import pytest
import torch
import train_daformer
from examples_helpers import assert_same_state, crash_after, load_checkpoint, write_fixture
from test_examples_runtime import OpRecorder, sync_watch
from test_train_daformer import argv, train_with
from uda import daformer_options, weights
from uda.daformer_net import DAFormerNet

IGNORE = protocl.IGNORE_INDEX


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_fixture(tmp_path_factory.mktemp("contrast_data"))


def build(data, out, *extra):
    return train_daformer.setup(daformer_options.parse_args(argv(data, out, "--no-control", *extra)))


# ---------------------------------------------------------------------------------------------- static labels
def static_reference(logits: torch.Tensor, threshold: float, top: int, bottom: int) -> torch.Tensor:
    """The recipe's static labels, one pixel at a time in float64."""
    B, K, H, W = logits.shape
    out = torch.full((B, H, W), IGNORE, dtype=torch.int64)
    z = logits.double()
    for b in range(B):
        for i in range(top, H - bottom):
            for j in range(W):
                scores = [float(z[b, k, i, j]) for k in range(K)]
                best = max(range(K), key=lambda k: (scores[k], -k))
                total = sum(torch.tensor(s - scores[best], dtype=torch.float64).exp().item() for s in scores)
                if 1.0 / total >= threshold:
                    out[b, i, j] = best
    return out


@pytest.mark.parametrize("rows", [(0, 0), (2, 3)])
def test_recipe_static_labels_match_a_loop(data, tmp_path, rows):
    run = build(data, tmp_path / "run", "--contrast", "--ignore-rows", *map(str, rows), "--pseudo-threshold", "0.6")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 19, 9, 7, generator=g, dtype=torch.float64) * 3
    got = train_daformer.static_labels(run, logits)
    ref = static_reference(logits, 0.6, *rows)
    assert torch.equal(got, ref)
    assert (ref != IGNORE).any() and (ref == IGNORE).any()  # both cases exercised


def test_class_balanced_static_labels_are_protocls_on_the_batch(data, tmp_path):
    run = build(data, tmp_path / "run", "--contrast", "--contrast-labels", "class-balanced", "--proportion", "0.3",
                "--ignore-rows", "1", "2")
    logits = torch.randn(2, 19, 10, 8, generator=torch.Generator().manual_seed(1)) * 2
    for _ in range(2):  # the thresholds are the batch's: a second call does not accumulate the first
        got = train_daformer.static_labels(run, logits)
    cbt = protocl.ClassBalancedThresholds(19, 0.3)
    cbt.update(logits)
    ref = protocl.static_pseudo_label(logits, class_thresholds=cbt.compute(), proportion=0.3)
    ref[:, :1], ref[:, -2:] = IGNORE, IGNORE
    assert torch.equal(got, ref)


# ---------------------------------------------------------------------------------------------- the step
def test_before_contrast_start_the_run_is_the_recipe_bit_for_bit(data, tmp_path):
    recipe, contrast = tmp_path / "recipe", tmp_path / "contrast"
    assert train_with(argv(data, recipe, "--no-control", "--iters", "3")) == 0
    assert train_with(argv(data, contrast, "--no-control", "--iters", "3", "--contrast", "--contrast-start", "3")) == 0
    a, b = load_checkpoint(recipe / "checkpoint.pt"), load_checkpoint(contrast / "checkpoint.pt")
    assert_same_state(a["model"], b["model"], "model")
    assert not b["contrast"]["source_ema.initialized"].any()  # never updated before its start


def test_one_backward_of_every_term_keeps_the_recipes_gradients(data, tmp_path):
    """With lambda_FCL = lambda_BCL = 0 from iteration 0, the contrast's single backward (source graph kept)
    trains the same network as the recipe's separate backwards, up to the order of float sums; the EMAs move."""
    recipe, contrast = tmp_path / "recipe", tmp_path / "contrast"
    assert train_with(argv(data, recipe, "--no-control", "--iters", "3")) == 0
    assert train_with(argv(data, contrast, "--no-control", "--iters", "3", "--contrast", "--contrast-start", "0",
                           "--fcl-weight", "0", "--bcl-weight", "0")) == 0
    a, b = load_checkpoint(recipe / "checkpoint.pt"), load_checkpoint(contrast / "checkpoint.pt")
    tensors = {name: value for name, value in a["model"].items() if isinstance(value, torch.Tensor)}
    assert len(tensors) > 100
    for name, value in tensors.items():
        torch.testing.assert_close(b["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert b["contrast"]["source_ema.initialized"].any()
    # and with the default weights the contrast does change the network
    moved = tmp_path / "moved"
    assert train_with(argv(data, moved, "--no-control", "--iters", "3", "--contrast", "--contrast-start", "0")) == 0
    c = load_checkpoint(moved / "checkpoint.pt")
    assert not torch.allclose(c["model"]["decode_head.conv_seg.weight"], a["model"]["decode_head.conv_seg.weight"])
    assert "fcl" in (moved / "log.txt").read_text()


@pytest.mark.parametrize("target", ["mixed", "clean"])
def test_hybrid_labels_replace_the_teachers_where_they_label(data, tmp_path, target):
    run = build(data, tmp_path / "run", "--contrast", "--hybrid-ce", "--contrast-target", target,
                "--contrast-start", "0", "--threshold", "0.0")
    g = torch.Generator().manual_seed(2)
    B, H, W, D = 2, 32, 32, run.model.feature_dim
    y_s = torch.randint(0, 4, (B, H, W), generator=g)
    y_t = torch.randint(0, 4, (B, H, W), generator=g)
    s_t = torch.where(torch.rand(B, H, W, generator=g) < 0.3, y_t, IGNORE)
    masks = (torch.rand(B, 1, H, W, generator=g) < 0.5).float()
    y_m = torch.where(masks[:, 0] > 0, y_s, y_t)
    f_s, f_m = torch.randn(B, D, 8, 8, generator=g), torch.randn(B, D, 8, 8, generator=g)
    x_t = torch.rand(B, 3, H, W, generator=g) * 255
    before = copy.deepcopy(run.contrast)
    run.model.eval()  # the clean pass: the same features in the step and here (no dropout, no drop path)
    with torch.no_grad():
        extra, labels = train_daformer.contrast_terms(run, x_t, y_s, y_t, s_t, masks, f_s, f_m, y_m)
        s_m = torch.where(masks[:, 0] > 0, y_s, s_t)
        f_t, static = (f_m, s_m) if target == "mixed" else (run.net(x_t)[1], s_t)
        hybrid = before(f_s, y_s, f_t, static).target_labels
    if target == "mixed":
        expected = torch.where(hybrid != IGNORE, hybrid, y_m)
    else:
        expected = torch.where(masks[:, 0] > 0, y_s, torch.where(hybrid != IGNORE, hybrid, y_t))
    assert torch.equal(labels, expected)
    assert (hybrid != static).any() and (static == IGNORE).any()  # the dynamic labels did fill in
    assert extra["loss"].ndim == 0


# ---------------------------------------------------------------------------------------------- sync, resume
def test_the_contrast_adds_no_device_read_to_the_step(data, tmp_path):
    """The op recorder of the pipeline tests, on the steps of the recipe and of the recipe with the contrast: on a
    CPU the recipe itself reads host values (AdamW's step counter, ClassMix's label range: no device sync on
    CUDA, where tests/test_train_daformer.py runs it under sync-debug), so the contrast's steps must read exactly
    what the recipe's read; only the first (value-checked) step may read more."""

    def record(*options):
        steps: list = []
        out = tmp_path / f"run{len(options)}"
        assert train_with(argv(data, out, "--no-control", "--iters", "4", "--mic", "--mic-block", "4", *options),
                          sync_watch(steps)) == 0
        return [(checked, syncs) for _, checked, syncs, _ in steps]

    recipe = record()
    contrast = record("--contrast", "--contrast-start", "0")
    assert [checked for checked, _ in contrast] == [True, False, False, False]
    assert [syncs for checked, syncs in contrast if not checked] == [syncs for checked, syncs in recipe if not checked]
    assert len(contrast[0][1]) > len(recipe[0][1])  # not blind: the first step's label-value checks are seen


@pytest.mark.parametrize("labels", ["recipe", "class-balanced"])
def test_the_contrasts_own_code_reads_no_device_value(data, tmp_path, labels):
    """Every option at once (projection, clean pass, class-balanced labels, hybrid CE, purity): the static labels
    and the contrast's terms read nothing back, value checks off as on every step but a phase's first."""
    run = build(data, tmp_path / "run", "--contrast", "--contrast-features", "projection", "--contrast-dim", "16",
                "--contrast-target", "clean", "--contrast-labels", labels, "--hybrid-ce", "--proto-resize", "purity")
    g = torch.Generator().manual_seed(3)
    B, H, W = 2, 32, 32
    x_s, x_t = torch.rand(B, 3, H, W, generator=g) * 255, torch.rand(B, 3, H, W, generator=g) * 255
    y_s = torch.randint(0, 19, (B, H, W), generator=g)
    masks = (torch.rand(B, 1, H, W, generator=g) < 0.5).float()
    protocl.set_value_checks(False)
    try:
        with OpRecorder() as recorder:
            logits = torch.nn.functional.interpolate(run.teacher(x_t)[0], size=(H, W), mode="bilinear")
            y_t = logits.argmax(1)
            s_t = train_daformer.static_labels(run, logits)
            f_s, f_m = run.net(x_s)[1], run.net(x_t)[1]
            extra, y_m = train_daformer.contrast_terms(run, x_t, y_s, y_t, s_t, masks, f_s, f_m, y_t)
            extra["loss"].backward()
    finally:
        protocl.set_value_checks(True)
    assert recorder.syncs == [] and recorder.mixed == []
    assert run.model.projection_head.out.weight.grad is not None


def test_a_crash_with_the_contrast_resumes_exactly(data, tmp_path):
    extra = ("--no-control", "--contrast", "--contrast-start", "1", "--contrast-labels", "class-balanced")
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert train_with(argv(data, whole, *extra)) == 0
    assert train_with(argv(data, broken, *extra), crash_after(5)) == 1
    assert train_with(argv(data, broken, *extra, "--resume", "auto")) == 0
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(broken / "checkpoint.pt")
    for key in ("model", "teacher", "optimizer", "contrast", "metrics"):
        assert_same_state(a[key], b[key], key)


def test_bf16_contrast_runs(data, tmp_path):
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--no-control", "--iters", "3", "--amp", "bf16", "--contrast",
                           "--contrast-start", "0")) == 0
    assert 0.0 <= json.loads((out / "metrics.json").read_text())["adapted"]["miou"] <= 100.0


# ---------------------------------------------------------------------------------------------- the projection
def test_sepicos_projection_head_shapes_groups_and_rebuild(tmp_path):
    net = DAFormerNet("mit-b0", 5, features="projection", proj_dim=24)
    logits, features = net(torch.rand(2, 3, 64, 96) * 255)
    assert logits.shape == (2, 5, 16, 24) and features.shape == (2, 24, 16, 24) and net.feature_dim == 24
    assert net.projection_head.hidden.conv.in_channels == 32 + 64 + 160 + 256  # MiT-B0's four stages
    head = {id(p) for g in net.param_groups(1.0, weight_decay=0.01) if g["lr"] == 10.0 for p in g["params"]}
    assert all(id(p) in head for p in net.projection_head.parameters())  # the decoder's 10x lr, as SePiCo's
    path = tmp_path / "net.pt"
    torch.save({"model": net.state_dict()}, path)
    rebuilt, _ = weights.build_model_for(str(path))
    assert rebuilt.feature_source == "projection" and rebuilt.feature_dim == 24
    torch.testing.assert_close(rebuilt.eval()(torch.full((1, 3, 64, 64), 100.0))[1],
                               net.eval()(torch.full((1, 3, 64, 64), 100.0))[1])
    with pytest.raises(ValueError, match="expected features"):
        DAFormerNet("mit-b0", 5, features="aspp")


@pytest.mark.parametrize("bad, message", [
    (("--arch", "tiny", "--contrast-features", "projection"), "needs a MiT encoder"),
    (("--temperature", "0"), "--temperature > 0, .*got 3000, 0.1, 0.1, 0.0"),
    (("--contrast-start", "-1"), "--contrast-start >= 0"),
])
def test_bad_contrast_options_are_refused(data, tmp_path, bad, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        daformer_options.parse_args(argv(data, out, "--contrast", *bad))  # the last --arch wins
    assert not out.exists()


def test_a_run_without_the_projection_does_not_resume_a_projection_checkpoint(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--no-control", "--iters", "2", "--contrast", "--contrast-features",
                           "projection", "--contrast-dim", "16")) == 0
    assert train_daformer.main(argv(data, out, "--no-control", "--iters", "4", "--contrast", "--resume", "auto")) == 2
    assert "projection" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- the evidence
def test_the_study_rule_and_the_default_follow_the_cached_evidence():
    """The rule of benchmarks/study/daformer_contrast.py on a hand-made table, then on the cached runs: the
    script's default is on exactly when the report clears issue 27's rule."""
    from benchmarks.study import daformer_contrast as study

    def table(recipe, control, arms):
        return {shift: {str(s): {"recipe": {"adapted": recipe[shift][i], "source_only": control[shift][i]},
                                 **{arm: {"adapted": v[shift][i]} for arm, v in arms.items()}}
                        for i, s in enumerate((*study.CHOOSE_SEEDS, *study.REPORT_SEEDS))}
                for shift in study.SHIFTS}

    flat = {shift: [50.0] * 6 for shift in study.SHIFTS}
    arms = {arm: {shift: [50.0] * 6 for shift in study.SHIFTS} for arm in study.CONFIGS}
    arms["clean"] = {shift: [52.0] * 6 for shift in study.SHIFTS}
    arms["fused"] = {**{shift: [60.0] * 6 for shift in study.SHIFTS}, "clutter": [49.0] * 6}  # best, but not worst
    chosen, gains = study.choose(table(flat, flat, arms))
    assert chosen == "clean" and gains["clean"] == pytest.approx(2.0) and gains["fused"] == pytest.approx(-1.0)
    assert study.default_on(table(flat, flat, arms), "clean")[0]
    below_control = {**flat, "photo": [55.0, 55.0, 55.0, 54.0, 55.0, 56.0]}  # report mean 55, std 1
    assert not study.default_on(table(flat, below_control, arms), "clean")[0]  # 52 < 55 - 1

    cached = study.load()
    assert all(len(cached[shift]) == 6 for shift in study.SHIFTS)
    chosen, _ = study.choose(cached)
    assert daformer_options.parse_args([]).contrast == study.default_on(cached, chosen)[0]


def test_a_contrast_run_is_not_resumed_without_the_contrast(data, tmp_path, capsys):
    """Resuming without --contrast would drop the prototype EMAs the checkpoint holds: refused, nothing written."""
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--no-control", "--iters", "2", "--contrast", "--contrast-start", "0")) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert train_daformer.main(argv(data, out, "--no-control", "--iters", "4", "--resume", "auto")) == 2
    assert "expected --contrast to resume" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
