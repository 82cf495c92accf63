"""``--target-ce`` (examples/uda/target_ce.py): issue 20's candidate rules for the target CE, as options.

The rules themselves are checked against plain loops in tests/test_signals.py (the study's names for them are
re-exports of uda.target_ce); here: the option reaches the step, equals the study's hook, and is validated.
"""

from __future__ import annotations

import functools

import pytest
import torch
import train_gta2cs
from examples_helpers import TINY_RUN, build, data_args, write_fixture
from uda import options, target_ce

import protocl

IG = protocl.IGNORE_INDEX


def _train(run, step=train_gta2cs.adapt_step) -> dict:
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step=step)
    return {k: v.clone() for k, v in run.model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("rule", ["margin", "hires_margin"])
def test_option_equals_the_study_hook(tmp_path, rule):
    """The run with ``--target-ce RULE`` trains exactly as the default run given the study's hook for RULE."""
    from benchmarks.study import gates

    gta, cs = write_fixture(tmp_path / "data")
    common = [*TINY_RUN, "--no-control", "--no-diagnostics"]
    by_option = _train(build([*data_args(gta, cs, tmp_path / "a"), *common, "--target-ce", rule]))
    run = build([*data_args(gta, cs, tmp_path / "b"), *common])
    assert run.target_ce is None  # the default: the paper's hybrid labels, no hook
    hook = gates.target_labels_hook(rule, 19, threshold=run.contrast.threshold)
    by_hook = _train(run, functools.partial(train_gta2cs.adapt_step, target_labels=hook))
    default = _train(build([*data_args(gta, cs, tmp_path / "c"), *common]))
    assert by_option.keys() == by_hook.keys()
    for key in by_option:
        assert torch.equal(by_option[key], by_hook[key]), key
    assert any(not torch.equal(by_option[k], default[k]) for k in by_option), "the rule changed nothing"


def test_full_margin_keeps_only_static_labels_in_the_target_ce(tmp_path):
    """At the largest margin (2, no cosine difference reaches it) no dynamic fill-in survives: the target CE
    trains on the static labels alone, while FCL/BCL still get the hybrid labels."""
    gta, cs = write_fixture(tmp_path / "data")
    run = build([*data_args(gta, cs, tmp_path / "out"), *TINY_RUN, "--no-control", "--target-ce", "margin",
                 "--target-ce-margin", "2"])
    seen = []

    def step(run, src, tgt, **kw):
        stats, labels = train_gta2cs.adapt_step(run, src, tgt, **kw)
        if labels is not None:
            seen.append((tgt["static"].long(), labels["hybrid"], labels["dynamic"]))
        return stats, labels

    _train(run, step)
    assert seen
    for static, ce_labels, _ in seen:
        assert torch.equal(ce_labels, static)
    assert any(((s == IG) & (d != IG)).any() for s, _, d in seen), "no dynamic fill-in to drop: the test is void"


@pytest.mark.parametrize("argv, message", [
    (["--target-ce-margin", "-0.1"], "expected --target-ce-margin in"),
    (["--target-ce-margin", "2.5"], "expected --target-ce-margin in"),
    (["--target-ce", "hires", "--no-dynamic"], "--no-dynamic"),
])
def test_bad_settings_are_named(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        options.parse_args(["--out", str(tmp_path), *argv])


def test_hook_validation():
    assert target_ce.hook("hybrid", threshold=0.7) is None
    with pytest.raises(ValueError, match="expected rule in"):
        target_ce.hook("gated", threshold=0.7)
    with pytest.raises(ValueError, match="expected margin in"):
        target_ce.hook("margin", threshold=0.7, margin=3.0)
    with pytest.raises(ValueError, match="prototype cosines"):
        target_ce.hook("hires", threshold=0.7)(None, torch.zeros(1, 2, 2, dtype=torch.long), None, None)
