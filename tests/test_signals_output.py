"""The label-free signals' cosines from the orchestrator's own output (issue 25.4): bit-equal to the recompute the
pipeline ran before (``signals.similarities`` as it was, kept as ``benchmarks/bench.py``'s
``recompute_similarities``: the oracle here, the "before" of the step benchmark), and the signals and target-CE rules
built on them unchanged."""

from __future__ import annotations


import pytest
import torch
from bench import recompute_similarities as _recompute  # the pipeline's recompute before issue 25
from uda import signals, target_ce

import protocl

IG = protocl.IGNORE_INDEX


def _batch(g, k, d, b=3, grid=(7, 9), label=(25, 31)):
    """Features in the graph, source labels with ignored pixels and a class absent from each image, static
    labels with most pixels ignored; label grid / feature grid ratios 25/7 and 31/9 (not integers)."""
    f_s = torch.randn(b, d, *grid, generator=g).requires_grad_(True)
    f_t = torch.randn(b, d, *grid, generator=g).requires_grad_(True)
    y_s = torch.randint(0, k, (b, *label), generator=g)
    y_s[y_s == torch.arange(b)[:, None, None] % k] = k - 1  # class b % k absent from source image b
    y_s = torch.where(torch.rand(b, *label, generator=g) < 0.2, IG, y_s)
    y_s[-1] = IG  # a source image with no label at all: no prototype
    y_f = torch.where(torch.rand(b, *label, generator=g) < 0.7, IG, torch.randint(0, k, (b, *label), generator=g))
    return f_s, y_s, f_t, y_f


@pytest.mark.parametrize("calibrate", [True, False])
@pytest.mark.parametrize("dynamic", [True, False])
def test_signals_from_the_output_are_bit_equal_to_the_recompute(calibrate, dynamic):
    g = torch.Generator().manual_seed(7)
    k, d, threshold = 6, 16, 0.1
    contrast = protocl.BidirectionalContrast(k, d, threshold=threshold, momentum=0.5, calibrate=calibrate,
                                             dynamic=dynamic, sync=False)
    for step in range(4):  # the EMAs initialise on step 0; the later steps calibrate with them
        f_s, y_s, f_t, y_f = _batch(g, k, d)
        old = _recompute(contrast, f_s, y_s, f_t)  # before the step: its EMA update moves the calibration
        out = contrast(f_s, y_s, f_t, y_f, return_similarities=True)
        new = signals.Similarities.from_output(out)
        assert torch.equal(new.cosine, old.cosine) and torch.equal(new.valid, old.valid), step
        assert new.cosine.dtype == torch.float32 and not new.cosine.requires_grad
        assert not new.valid.all() and not new.valid[-1].any()
        prediction = torch.randint(0, k, y_f.shape, generator=g)
        counts = [signals.step_counts(y_f, out.dynamic_labels, out.target_labels, prediction, sims, threshold, k)
                  for sims in (old, new)]
        assert torch.equal(counts[0], counts[1]), step
        if dynamic and step > 0:
            assert counts[1][signals.ROWS.index("cells")].sum() > 0  # cells above the threshold were counted
        for rule in ("margin", "hires", "hires_margin"):
            hook = target_ce.hook(rule, threshold=threshold)
            assert torch.equal(hook(out, y_f, None, old), hook(out, y_f, None, new)), (rule, step)
    assert bool(contrast.source_ema.initialized.any())


def test_the_study_gates_read_the_new_similarities():
    from study.gates import target_labels_hook

    g = torch.Generator().manual_seed(1)
    k, d = 5, 8
    contrast = protocl.BidirectionalContrast(k, d, threshold=0.1, momentum=0.5, sync=False)
    for _ in range(2):
        f_s, y_s, f_t, y_f = _batch(g, k, d, grid=(5, 6), label=(11, 13))
        old = _recompute(contrast, f_s, y_s, f_t)
        out = contrast(f_s, y_s, f_t, y_f, return_similarities=True)
    new = signals.Similarities.from_output(out)
    logits = torch.randn(3, k, 11, 13, generator=g)
    for rule in ("hires", "margin", "hires_margin"):
        hook = target_labels_hook(rule, k, threshold=0.1)
        assert torch.equal(hook(out, y_f, logits, new), hook(out, y_f, logits, old)), rule


def test_from_output_needs_the_request():
    g = torch.Generator().manual_seed(2)
    contrast = protocl.BidirectionalContrast(4, 8, sync=False)
    out = contrast(*_batch(g, 4, 8, b=2, grid=(3, 4), label=(6, 8)))
    with pytest.raises(ValueError, match=r"out: expected .*return_similarities=True"):
        signals.Similarities.from_output(out)


def test_the_benchmark_times_two_steps_with_equal_signals():
    """``python -m benchmarks.bench --cases step``: its timed steps compute the same loss and bit-equal signal
    counts (the recompute and step_counts as they were before issue 25, the recompute with today's step_counts,
    the cosines from the output), step after step."""
    import bench

    case = bench.Case("tiny", 2, 8, 5, 19, 5)
    impls = bench.step_implementations(case, bench.make_inputs(case, "cpu"))
    for _ in range(3):  # the EMAs initialise on the first call; the later ones calibrate
        loss_before, counts_before = impls["step_before"]()  # the recompute and step_counts as they were
        (loss_old, counts_old), (loss_new, counts_new) = impls["step_recompute"](), impls["step_output"]()
        loss_plain, counts_plain = impls["step_no_signals"]()
        assert torch.equal(loss_before, loss_new) and torch.equal(loss_old, loss_new)
        assert torch.equal(loss_new, loss_plain) and counts_plain is None
        assert torch.equal(counts_before, counts_new) and torch.equal(counts_old, counts_new)
        assert counts_new.shape == (len(signals.ROWS), 5) and counts_new.sum() > 0
