"""The label-free reliability signals (examples/uda/signals.py, issue 20) against plain loops, and in a run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import train_gta2cs
from examples_helpers import TINY_RUN, build, data_args, write_fixture
from uda import signals

import protocl

IG = protocl.IGNORE_INDEX


def _random_maps(seed: int, k: int = 5, shape=(2, 8, 12)):
    g = torch.Generator().manual_seed(seed)
    truth = torch.randint(0, k, shape, generator=g)
    static = torch.where(torch.rand(shape, generator=g) < 0.4, truth, IG)
    dynamic = torch.where(torch.rand(shape, generator=g) < 0.6, truth, torch.randint(0, k, shape, generator=g))
    dynamic = torch.where(torch.rand(shape, generator=g) < 0.25, IG, dynamic)
    hybrid = torch.where(static != IG, static, dynamic)
    prediction = torch.where(torch.rand(shape, generator=g) < 0.5, truth, torch.randint(0, k, shape, generator=g))
    cosine = torch.rand(shape[0], k, 4, 6, generator=g) * 2 - 1
    valid = torch.rand(shape[0], k, generator=g) < 0.8
    valid[:, 0] = True
    cosine = torch.where(valid[:, :, None, None], cosine, torch.full_like(cosine, -math.inf))
    return static, dynamic, hybrid, prediction, signals.Similarities(cosine, valid)


def _loop_counts(static, dynamic, hybrid, prediction, sims, threshold, k):
    rows = {r: [0.0] * k for r in signals.ROWS}
    for s, d, h, p in zip(static.flatten().tolist(), dynamic.flatten().tolist(), hybrid.flatten().tolist(),
                          prediction.flatten().tolist()):
        if d != IG:
            rows["dynamic"][d] += 1
            rows["dynamic_pred"][d] += p == d
            if s != IG:
                rows["overlap"][d] += 1
                rows["agree"][d] += s == d
        if h != IG:
            rows["hybrid"][h] += 1
            rows["hybrid_pred"][h] += p == h
        if s != IG:
            rows["static"][s] += 1
    b, _, hh, ww = sims.cosine.shape
    for i in range(b):
        for y in range(hh):
            for x in range(ww):
                values = sims.cosine[i, :, y, x].tolist()
                order = sorted(range(k), key=lambda c: (-values[c], c))
                best = values[order[0]]
                if best > threshold:
                    second = max(values[order[1]], -1.0)
                    rows["margin_sum"][order[0]] += best - second
                    rows["cells"][order[0]] += 1
    return torch.tensor([rows[r] for r in signals.ROWS], dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [-1.0, 0.3])
def test_step_counts_against_a_loop(seed, threshold):
    maps = _random_maps(seed)
    got = signals.step_counts(*maps, threshold, 5)
    assert got.dtype == torch.float64 and got.shape == (len(signals.ROWS), 5)
    torch.testing.assert_close(got, _loop_counts(*maps, threshold, 5))


def test_summarize_against_the_definitions():
    static, dynamic, hybrid, prediction, sims = _random_maps(7)
    counts = signals.step_counts(static, dynamic, hybrid, prediction, sims, 0.0, 5)
    ema = protocl.PrototypeEMA(5, 3, 0.9, sync=False)
    protos = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0, 1], [0, 0, -1]])
    ema.update_from(protos[None], torch.tensor([[4.0, 4, 4, 4, 0]]))  # class 4 never seen: not initialised
    got = signals.summarize(counts, ema)
    for c in range(5):
        both = (static != IG) & (dynamic == c)
        if both.any():
            assert got["static_agreement"][c] == pytest.approx((static[both] == c).double().mean().item())
        else:
            assert math.isnan(got["static_agreement"][c])
        mine = dynamic == c
        assert got["prediction_agreement"][c] == pytest.approx((prediction[mine] == c).double().mean().item())
        h = hybrid == c
        assert got["hybrid_prediction_agreement"][c] == pytest.approx((prediction[h] == c).double().mean().item())
        assert got["inflation"][c] == pytest.approx(mine.sum().item() / ((static == c).sum().item() + 1))
    # separation: 1 - max cosine with another initialised class; class 4 not initialised
    unit = torch.nn.functional.normalize(protos[:4], dim=1)
    cos = unit @ unit.T
    for c in range(4):
        others = [cos[c, o].item() for o in range(4) if o != c]
        assert got["separation"][c] == pytest.approx(1 - max(others), abs=1e-6)
    assert math.isnan(got["separation"][4])
    defined = [v for v in got["margin"] if not math.isnan(v)]
    assert got["class_mean_margin"] == pytest.approx(sum(defined) / len(defined))


def test_a_class_with_no_overlap_is_undefined_not_zero():
    k = 3
    static = torch.tensor([[[0, 0, IG, IG]]])
    dynamic = torch.tensor([[[0, 1, 2, IG]]])
    sims = signals.Similarities(torch.full((1, k, 1, 1), 0.5), torch.ones(1, k, dtype=torch.bool))
    got = signals.summarize(signals.step_counts(static, dynamic, dynamic, dynamic, sims, 0.9, k))
    assert got["static_agreement"][0] == 1.0 and got["static_agreement"][1] == 0.0  # 1 met a static 0
    assert math.isnan(got["static_agreement"][2])  # 2 never met a static label: no evidence
    assert math.isnan(got["margin"][0])  # no cell above the threshold
    assert got["inflation"][2] == 1.0 and got["inflation"][0] == pytest.approx(1 / 3)


def test_similarities_are_the_ones_behind_the_dynamic_labels():
    """From the orchestrator's output, their argmax above the threshold (nearest-upsampled) is exactly the
    orchestrator's y_D, for a calibrated orchestrator whose EMAs have moved."""
    g = torch.Generator().manual_seed(3)
    k, d = 4, 6
    contrast = protocl.BidirectionalContrast(k, d, threshold=0.2, momentum=0.5, sync=False)
    for step in range(3):
        f_s, f_t = torch.randn(2, d, 5, 7, generator=g), torch.randn(2, d, 5, 7, generator=g)
        y_s = torch.randint(0, k, (2, 20, 28), generator=g)
        y_f = torch.where(torch.rand(2, 20, 28, generator=g) < 0.3, torch.randint(0, k, (2, 20, 28), generator=g), IG)
        out = contrast(f_s, y_s, f_t, y_f, return_similarities=True)
        sims = signals.Similarities.from_output(out)
        best, arg = sims.cosine.max(1)
        mine = torch.where(best > 0.2, arg, IG)
        mine = protocl.resize_labels(mine, (20, 28))
        assert torch.equal(mine, out.dynamic_labels), step


def _run(tmp_path, extra):
    gta, cs = write_fixture(tmp_path / "data")
    run = build([*data_args(gta, cs, tmp_path / "out"), *TINY_RUN, "--no-control", *extra])
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state)
    train_gta2cs.finish(run, state)
    return json.loads((tmp_path / "out" / "metrics.json").read_text()), (tmp_path / "out" / "log.txt").read_text()


def test_signals_in_the_log_and_metrics_of_every_run_without_target_labels(tmp_path):
    metrics, log = _run(tmp_path, ["--no-diagnostics"])  # no target ground truth read at all
    assert [entry["round"] for entry in metrics["signals"]] == [0, 1]
    for entry in metrics["signals"]:
        assert set(signals.SIGNALS) <= set(entry) and len(entry["static_agreement"]) == 19
        assert sum(entry["counts"]["hybrid"]) > 0
    assert "label-free reliability signals" in log and "signals (round so far, label-free)" in log
    off, log_off = _run(tmp_path / "off", ["--no-signals"])
    assert "signals" not in off and "reliability signals" not in log_off and "signals (round so far" not in log_off


def test_the_round_counts_are_the_sum_of_the_steps(tmp_path):
    """What adapt_round adds up per round is the sum of the steps' counts (the step recomputed by a wrapper)."""
    gta, cs = write_fixture(tmp_path / "data")
    run = build([*data_args(gta, cs, tmp_path / "out"), *TINY_RUN, "--no-control"])
    state = train_gta2cs.start(run)
    seen = []

    def step(run, src, tgt):
        stats, labels = train_gta2cs.adapt_step(run, src, tgt)
        seen.append(stats["signal_counts"].clone())
        return stats, labels

    train_gta2cs.train_source(run, state)
    train_gta2cs.end_source(run, state)
    state["thresholds"] = train_gta2cs.make_static_labels(run, 0)
    train_gta2cs.adapt_round(run, state, step=step, until=3)
    torch.testing.assert_close(state["signal_counts"], torch.stack(seen).sum(0))


# ---------------------------------------------------------------------------------------------- candidate fixes
def test_label_resolution_dynamic_labels_against_a_loop():
    """Rule hires: bilinear (align_corners=False) upsampling of each valid class's cosine map, then arg max and
    threshold per pixel, then fill into the static labels."""
    from benchmarks.study import gates

    static, _, _, _, sims = _random_maps(11, shape=(2, 8, 12))
    dynamic, hybrid = gates.label_resolution_dynamic(sims, static, 0.2)
    with_margin, _ = gates.label_resolution_dynamic(sims, static, 0.2, margin=0.1)
    b, k, h, w = sims.cosine.shape
    H, W = static.shape[-2:]

    def bilinear(grid, y, x):  # the align_corners=False source coordinate, clamped at the borders
        sy, sx = max((y + 0.5) * h / H - 0.5, 0.0), max((x + 0.5) * w / W - 0.5, 0.0)
        y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = sy - y0, sx - x0
        return ((1 - fy) * ((1 - fx) * grid[y0][x0] + fx * grid[y0][x1])
                + fy * ((1 - fx) * grid[y1][x0] + fx * grid[y1][x1]))

    for i in range(b):
        for y in range(H):
            for x in range(W):
                values = [bilinear(sims.cosine[i, c].tolist(), y, x) if sims.valid[i, c] else -math.inf
                          for c in range(k)]
                best = max(values)
                want = values.index(best) if best > 0.2 else IG
                assert abs(best - 0.2) < 1e-5 or dynamic[i, y, x].item() == want, (i, y, x)
                second = max(sorted(values)[-2], -1.0)
                if abs(best - second - 0.1) > 1e-5 and abs(best - 0.2) > 1e-5:
                    assert with_margin[i, y, x].item() == (want if best - second >= 0.1 else IG), (i, y, x)
                s = static[i, y, x].item()
                assert hybrid[i, y, x].item() == (s if s != IG else dynamic[i, y, x].item())


def test_margin_gate_drops_only_ambiguous_fill_ins():
    from benchmarks.study import gates

    cosine = torch.tensor([[[[0.95, 0.95]], [[0.93, 0.5]], [[-math.inf, -math.inf]]]])  # (1, 3, 1, 2)
    sims = signals.Similarities(cosine, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(gates.margin_map(sims.cosine), torch.tensor([[[0.02, 0.45]]]))
    static = torch.tensor([[[1, IG, IG, IG]]])  # label grid 1 x 4: cells 0, 0, 1, 1
    hybrid = torch.tensor([[[1, 0, 0, 0]]])
    assert gates.gate_by_margin(static, hybrid, sims, 0.05).tolist() == [[[1, IG, 0, 0]]]


def test_class_off_uses_running_agreement():
    from benchmarks.study import gates

    off = gates.ClassOff(3, min_agreement=0.5, momentum=0.5)
    static = torch.tensor([[0, 0, IG, IG]])
    dynamic = torch.tensor([[1, 1, 1, 2]])  # dynamic 1 meets static 0 twice: disagrees
    hybrid = torch.where(static != IG, static, dynamic)
    assert off(static, dynamic, hybrid).tolist() == [[0, 0, IG, 2]]
    # next step: dynamic 1 agrees once; running: agree 1 of 0.5 * 2 + 1 = 2 overlap -> 50 %: back on
    static2, dynamic2 = torch.tensor([[1, IG, IG, IG]]), torch.tensor([[1, 1, 2, 0]])
    hybrid2 = torch.where(static2 != IG, static2, dynamic2)
    assert off(static2, dynamic2, hybrid2).tolist() == [[1, 1, 2, 0]]


@pytest.mark.parametrize("rule", ["hires", "margin", "class_off", "hires_margin"])
def test_candidate_hooks_run_in_the_pipeline(tmp_path, rule):
    import functools

    from benchmarks.study import gates

    gta, cs = write_fixture(tmp_path / "data")
    run = build([*data_args(gta, cs, tmp_path / "out"), *TINY_RUN, "--no-control"])
    hook = gates.target_labels_hook(rule, 19, threshold=run.contrast.threshold)
    state = train_gta2cs.start(run)
    train_gta2cs.train(run, state, step=functools.partial(train_gta2cs.adapt_step, target_labels=hook))
    train_gta2cs.finish(run, state)
    assert "adapted" in json.loads((tmp_path / "out" / "metrics.json").read_text())
    with pytest.raises(ValueError, match="expected the step's prototype cosines|expected rule"):
        if rule == "class_off":
            gates.target_labels_hook("nope", 19)
        hook(None, torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 19, 2, 2), None)


# ---------------------------------------------------------------------------------------------- the study's validation
def test_spearman_of_the_signal_validation():
    from benchmarks.study.adaptation_study import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks (0.5, 0.5, 2, 3), y ranks (0, 1, 2, 3) -> Pearson of the ranks
    rx, ry = [0.5, 0.5, 2, 3], [0, 1, 2, 3]
    mx, my = sum(rx) / 4, sum(ry) / 4
    want = (sum((a - mx) * (b - my) for a, b in zip(rx, ry))
            / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)))
    assert spearman([5, 5, 7, 9], [1, 2, 3, 4]) == pytest.approx(want)
    assert math.isnan(spearman([1, math.nan, 3], [1, 2, 3]))  # fewer than 3 defined pairs
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side


def test_signal_rhos_skip_classes_with_little_support():
    from benchmarks.study.adaptation_study import MIN_SUPPORT, signal_rhos

    nan = math.nan
    run = {"signals": [{"margin": [0.1, 0.2, 0.3, 0.9, nan], "dynamic_pixels": [MIN_SUPPORT] * 3 + [1, 0]}],
           "labels_train_crops": [{"dynamic": {"precision": [10.0, 30.0, 20.0, 0.0, 50.0]}}]}
    # class 3 (one pixel) would reverse the order; it is left out: ranks (0, 1, 2) vs (0, 2, 1)
    assert signal_rhos(run, "margin") == [pytest.approx(0.5)]
