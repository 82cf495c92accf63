r"""Smoke tests of the benchmark suite (benchmarks/): the scripts run end to end on tiny shapes, and the
release baseline computes the same numbers as protocl's release-compatible setting (the protocl method spec, §6).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import bench_step
import release_baseline

import protocl

K = 5


def _random_pair(seed: int, *, batch: int = 2, dim: int = 6, feature: int = 7, label: int = 29):
    r"""Random features and labels with ignore pixels; every image holds several classes."""
    g = torch.Generator().manual_seed(seed)
    fs = torch.randn(batch, dim, feature, feature, generator=g, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(batch, dim, feature, feature, generator=g, dtype=torch.float64, requires_grad=True)
    ys = torch.randint(0, K, (batch, label, label), generator=g)
    yt = torch.randint(0, K, (batch, label, label), generator=g)
    ys[torch.rand(ys.shape, generator=g) < 0.1] = 255
    yt[torch.rand(yt.shape, generator=g) < 0.3] = 255
    yt[yt == K - 1] = 0  # the target misses a class: absent prototypes and a partial overlap weight
    return fs, ys, ft, yt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_release_step_matches_protocl_release_compatible(dtype):
    # two pairs, two steps (the second uses calibrated prototypes from the EMAs of the first)
    step_ref = release_baseline.ReleaseStep(K, 6, momentum=0.9, threshold=0.3).to(dtype)
    step_new = protocl.BidirectionalContrast(K, 6, momentum=0.9, threshold=0.3, release_compatible=True)
    for seed in (3, 4):
        fs, ys, ft, yt = (t.to(dtype) if t.is_floating_point() else t for t in _random_pair(seed))
        ref = step_ref(fs, ys, ft, yt)
        new = step_new(fs, ys, ft, yt)
        assert torch.equal(new.target_labels, ref.target_labels)
        torch.testing.assert_close(new.fcl.to(dtype), ref.fcl)
        torch.testing.assert_close(new.bcl.to(dtype), ref.bcl)
        torch.testing.assert_close(
            torch.autograd.grad(new.loss, (fs, ft)), torch.autograd.grad(ref.loss, (fs, ft)),
        )
        torch.testing.assert_close(step_new.source_ema.prototypes.to(dtype), step_ref.source_ema)
        torch.testing.assert_close(step_new.target_ema.prototypes.to(dtype), step_ref.target_ema)


def test_release_cosine_zero_becomes_minus_one():
    # an all-zero (absent) prototype has cosine exactly 0, which the release maps to -1 (logit -1/temperature)
    features = torch.randn(3, 2, 2)
    prototypes = torch.zeros(2, 3)
    prototypes[0] = features[:, 0, 0]
    logits = release_baseline.release_logits(features, prototypes, temperature=0.1)
    assert torch.all(logits[1] == -10.0)
    torch.testing.assert_close(logits[0, 0, 0], torch.tensor(10.0))


def test_bench_step_quick_end_to_end(tmp_path):
    report = bench_step.main(["--quick", "--no-memory", "--repeats", "1", "--warmup", "1", "--out", str(tmp_path)])
    # the PNG needs matplotlib, a benchmarks-only dependency: without it the script writes JSON and Markdown only
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    for ext in ("json", "md", "png") if has_matplotlib else ("json", "md"):
        assert (tmp_path / f"bench_cpu_quick.{ext}").stat().st_size > 0
    saved = json.loads((tmp_path / "bench_cpu_quick.json").read_text())
    names = {i.name for i in bench_step.implementations(compile=False)}
    for case in saved["cases"]:
        assert set(case["timing"]) == names
        assert all(v["median_ms"] > 0 for v in case["timing"].values())
        assert set(case["speedup"]) == names - {"release_step", "release_loss"}
    assert "time_ratio_for_4x_pixels" in saved["goals"]
    static = report["static_labels"]["throughput"]
    assert static["update_images_per_s"] > 0 and static["max_abs_error_vs_exact"] <= 1e-3
    assert "## Goals" in (tmp_path / "bench_cpu_quick.md").read_text()


def test_bench_memory_measurement_in_process():
    case = bench_step.quick_cases()[0]
    impls = {i.name: i for i in bench_step.implementations(compile=False)}
    for name in ("release_step", "protocl_step-checks"):
        mem = bench_step.measure_memory(case, impls[name], "cpu")
        assert mem["peak_extra_mb"] >= 0 and mem["kind"] == "cpu_peak_rss_above_resident"


def test_bench_step_timings_on_same_inputs_agree_in_value():
    # the timed closures compute the losses they claim to: protocl's release-compatible step = the baseline step
    case = bench_step.quick_cases()[1]
    inputs = bench_step.make_inputs(case, "cpu")
    ref = bench_step.build_release_step(case, inputs, "cpu")()
    new = bench_step.build_protocl_step(case, inputs, "cpu", release_compatible=True)()
    torch.testing.assert_close(new, ref)


def test_gpu_check_smoke_trains_the_real_trainer(tmp_path):
    """``gpu_check.py --smoke``: every configuration of the GPU run (fp32/bf16, with/without protocl) end to end."""
    import gpu_check

    report = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    pipeline = report["pipeline"]
    for precision in ("fp32", "bf16"):
        for variant in ("full", "no_protocl"):
            entry = pipeline[f"{precision}_{variant}"]
            assert "error" not in entry, entry
            assert entry["exit_code"] == 0 and entry["stage2"]["steps_timed"] == 3  # 4 steps, 1 left out
            assert entry["stage2"]["median_ms"] > 0 and entry["static_labels"]["images"] == 4
            assert entry["static_labels"]["images_per_s"] > 0
        assert f"{precision}_protocl_share_of_step_pct" in pipeline
    assert report["protocl_step"] == {"skipped": "needs CUDA"}
    assert json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())["smoke"] is True
    table = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert "| bf16 no_protocl |" in table and "not a GPU figure" in table


def test_bench_step_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="expected a CUDA device"):
        bench_step.main(["--device", "cuda", "--quick", "--no-memory"])
