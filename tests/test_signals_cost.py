"""Issue 34: the cheaper signals of a stage-2 step give the same values. ``uda.signals.prediction`` is exactly
``torch.argmax(logits, 1)`` (ties, NaN, infinities, layouts, dtypes); ``uda.signals.step_counts`` equals the plain
float64 loop of tests/test_signals.py and, bit for bit, the implementation before issue 34
(``benchmarks/signals_cost.py``)."""

from __future__ import annotations

import math

import pytest
import torch
from test_signals import _loop_counts, _random_maps
from uda import signals

import protocl
from benchmarks import signals_cost

IG = protocl.IGNORE_INDEX
SHAPES = [(2, 5, 7, 9), (1, 19, 13, 11), (3, 1, 4, 4), (2, 2, 1, 1), (4, 19, 48, 48)]


def _tied_logits(shape, seed: int, dtype=torch.float32, special: bool = False) -> torch.Tensor:
    """Integer-valued logits (many repeated maxima); ``special``: NaN, ±inf and -0.0 spread in, whole rows too."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, shape, generator=g).to(dtype)
    if special:
        pick = torch.rand(shape, generator=g)
        x = torch.where(pick < 0.05, torch.full_like(x, math.nan), x)
        x = torch.where((pick >= 0.05) & (pick < 0.1), torch.full_like(x, math.inf), x)
        x = torch.where((pick >= 0.1) & (pick < 0.15), torch.full_like(x, -math.inf), x)
        x = torch.where((pick >= 0.15) & (pick < 0.2), torch.full_like(x, -0.0), x)
        x[0, :, 0, 0] = -math.inf  # a pixel of -inf only: class 0
        x[-1, :, -1, -1] = math.nan  # NaN only: class 0
        if shape[1] > 2:
            x[0, :, -1, -1] = torch.tensor([1.0, math.inf, math.nan] + [math.inf] * (shape[1] - 3))  # NaN beats inf
    return x


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("special", [False, True])
def test_prediction_is_argmax_with_ties_and_nan(shape, dtype, special):
    for seed in range(3):
        x = _tied_logits(shape, seed, dtype, special)
        got = signals.prediction(x)
        assert got.dtype == torch.int64 and torch.equal(got, x.argmax(1)), seed


@pytest.mark.parametrize("shape", SHAPES)
def test_prediction_is_argmax_on_every_layout(shape):
    x = _tied_logits((2 * shape[0], *shape[1:]), 4, special=True)
    views = {"batch half (as up[b:])": x[shape[0]:], "channels_last": x.contiguous(memory_format=torch.channels_last),
             "transposed": x.transpose(2, 3), "strided": x[:, :, ::2]}
    for name, v in views.items():
        assert torch.equal(signals.prediction(v), v.argmax(1)), name
    ints = torch.randint(-3, 3, shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(signals.prediction(ints), ints.argmax(1))


def test_prediction_of_logits_that_need_grad_records_no_graph():
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    got = signals.prediction(x)
    assert not got.requires_grad and torch.equal(got, x.detach().argmax(1))


def _tied_maps(seed: int, k: int, shape):
    """``_random_maps`` with the prediction an argmax of tied logits and cosines on a coarse grid (ties)."""
    static, dynamic, hybrid, _, sims = _random_maps(seed, k, shape)
    prediction = signals.prediction(_tied_logits((shape[0], k, *shape[1:]), seed))
    cosine = torch.where(sims.cosine.isfinite(), (sims.cosine * 4).round() / 4, sims.cosine)
    return static, dynamic, hybrid, prediction, signals.Similarities(cosine, sims.valid)


@pytest.mark.parametrize("k,shape", [(2, (1, 5, 4)), (5, (2, 8, 12)), (19, (3, 16, 10))])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.5])
def test_step_counts_against_the_loop_with_ties(k, shape, threshold):
    for seed in range(3):
        maps = _tied_maps(seed, k, shape)
        got = signals.step_counts(*maps, threshold, k)
        assert got.dtype == torch.float64 and got.shape == (len(signals.ROWS), k)
        torch.testing.assert_close(got, _loop_counts(*maps, threshold, k))
        assert torch.equal(got, signals_cost.step_counts_before(*maps, threshold, k))


@pytest.mark.parametrize("k", [1, 2, 5, 19])
@pytest.mark.parametrize("threshold", [-2.0, 0.0, 0.6])
def test_step_counts_as_before_on_nan_inf_and_ignored_predictions(k, threshold):
    for seed in range(4):
        static, dynamic, hybrid, prediction, sims = _tied_maps(seed, k, (2, 8, 12))
        g = torch.Generator().manual_seed(seed)
        cosine = sims.cosine.clone()
        pick = torch.rand(cosine.shape, generator=g)
        cosine[pick < 0.05] = math.nan
        cosine[(pick >= 0.05) & (pick < 0.1)] = math.inf
        prediction = torch.where(torch.rand(prediction.shape, generator=g) < 0.1, IG, prediction)  # as a caller may
        maps = (static, dynamic, hybrid, prediction, signals.Similarities(cosine, sims.valid))
        got = signals.step_counts(*maps, threshold, k)
        assert got.dtype == torch.float64 and got.is_contiguous()
        assert torch.equal(got, signals_cost.step_counts_before(*maps, threshold, k)), seed


def test_step_counts_with_more_classes_than_the_ignored_id():
    """K > IGNORE_INDEX (ids below it only): the ``where`` branch instead of the clamp."""
    g = torch.Generator().manual_seed(0)
    k = IG + 45

    def labels():
        return torch.where(torch.rand(2, 9, 9, generator=g) < 0.3, IG, torch.randint(0, IG - 1, (2, 9, 9), generator=g))

    for _ in range(3):
        static, dynamic, hybrid, prediction = labels(), labels(), labels(), torch.randint(0, IG - 1, (2, 9, 9), generator=g)
        dynamic[0, :3], prediction[1, :4], hybrid[0, 4:] = static[0, :3], dynamic[1, :4], prediction[0, 4:]
        sims = signals.Similarities(torch.rand(2, k, 3, 3, generator=g), torch.ones(2, k, dtype=torch.bool))
        maps = (static, dynamic, hybrid, prediction, sims)
        assert torch.equal(signals.step_counts(*maps, 0.5, k), signals_cost.step_counts_before(*maps, 0.5, k))


def test_the_benchmark_runs(tmp_path):
    text = signals_cost.main(["--repeats", "2", "--no-step", "--no-deeplab", "--out", str(tmp_path / "t.md")])
    assert "| prediction |" in text and (tmp_path / "t.md").read_text() == text
