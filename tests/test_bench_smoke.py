r"""Smoke tests of the benchmarks (benchmarks/): the scripts run end to end on tiny shapes, and what they time
computes what it claims to (protocl's release-compatible setting equals the release's loops in value)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import bench  # benchmarks/ is on the path (pytest's pythonpath option)
import pytest
import torch

import protocl


def test_bench_quick_end_to_end(tmp_path):
    report = bench.main(["--cases", "quick", "--no-memory", "--rounds", "2", "--min-time", "0.01",
                         "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert [c["case"]["name"] for c in saved["cases"]] == ["quick-a", "quick-b"]
    for case in report["cases"]:
        assert set(case["timing"]) == {"release", "protocl", "protocl_rc"}
        assert all(len(v["rounds_ms"]) == 2 and v["median_ms"] > 0 for v in case["timing"].values())
    text = (tmp_path / "bench_cpu.md").read_text()
    assert "| quick-a (D=8, 6²/24²) |" in text and "speed-up" in text


def test_bench_before_times_another_tree_in_the_same_rounds(tmp_path):
    # issue 28: --before loads a protocl tree beside the installed one (here: the same source, so the losses agree)
    src = Path(protocl.__file__).resolve().parents[1]
    report = bench.main(["--cases", "quick", "--no-memory", "--rounds", "2", "--min-time", "0.01", "--checks",
                         "--before", str(src), "--out", str(tmp_path)])
    timing = report["cases"][0]["timing"]
    assert {"before_protocl", "before_protocl_rc", "before_protocl_checked"} <= set(timing)
    assert all(timing[n]["vs_before"] > 0 for n in ("protocl", "protocl_rc", "protocl_checked"))
    assert "now / before" in (tmp_path / "bench_cpu_vs_before.md").read_text()
    before = sys.modules["protocl_before"]
    assert before is not protocl and before.fcl_loss is not protocl.fcl_loss
    case = bench.CASES["quick"][0]
    impls = bench.implementations(case, bench.make_inputs(case, "cpu"), before=before)
    torch.testing.assert_close(impls["before_protocl"](), impls["protocl"]())
    with pytest.raises(ValueError, match="--before"):
        bench.load_before(str(tmp_path))


def test_timed_implementations_compute_the_same_losses():
    case = bench.CASES["quick"][1]
    inputs = bench.make_inputs(case, "cpu")
    impls = bench.implementations(case, inputs)
    release, compatible = impls["release"](), impls["protocl_rc"]()
    torch.testing.assert_close(compatible, release, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(impls["protocl"]())


def test_memory_measurement_in_process():
    case = bench.CASES["quick"][0]
    for name in ("release", "protocl"):
        assert bench.measure_memory(case, name, "cpu")["peak_extra_mb"] >= 0


def test_goals_are_evaluated_on_the_issue_cases():
    timing = {"release": {"median_ms": 100.0}, "protocl": {"median_ms": 5.0}, "protocl_rc": {"median_ms": 20.0}}
    report = {"cases": [{"case": {"name": "d76-46"}, "timing": timing}]}
    got = {(g["implementation"], g["met"]) for g in bench.goals(report)}
    assert got == {("protocl", True), ("protocl_rc", False)}  # 20x >= 15x; 5x < 6x


def test_bench_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="expected a CUDA device"):
        bench.main(["--device", "cuda", "--cases", "quick", "--no-memory"])


def test_gpu_check_smoke_trains_the_real_pipeline(tmp_path):
    """``python -m benchmarks.gpu_check --smoke``: every configuration of the GPU run (fp32/bf16, with/without
    protocl) end to end, through the pipeline's own functions."""
    from benchmarks import gpu_check

    report = gpu_check.main(["--smoke", "--out", str(tmp_path)])
    pipeline = report["pipeline"]
    for precision in ("fp32", "bf16"):
        for variant in ("full", "no_protocl"):
            entry = pipeline[f"{precision}_{variant}"]
            assert "error" not in entry, entry
            assert entry["stage2"]["steps_timed"] == 3 and entry["stage1"]["steps_timed"] == 2  # 1 left out
            assert entry["stage2"]["median_ms"] > 0 and entry["static_labels"]["images"] == 4
            assert entry["static_labels"]["images_per_s"] > 0
        assert f"{precision}_protocl_share_of_step_pct" in pipeline
    assert report["protocl_step"] == {"skipped": "needs CUDA"}
    assert json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())["smoke"] is True
    table = (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert "| bf16 no_protocl |" in table and "not a GPU figure" in table


def test_daformer_cost_smoke_times_every_part_of_the_step(tmp_path):
    """``python -m benchmarks.daformer_cost --smoke --mic``: every part of the DAFormer-class step (MIC on) timed on
    a tiny run built as ``train_daformer.py`` builds it, the instrumented step equal to ``teacher_step``."""
    from benchmarks import daformer_cost

    # weight 1 everywhere: from scratch the pseudo-label weight is 0, which would hide a difference of the target terms
    report = daformer_cost.main(["--smoke", "--mic", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), "--",
                                 "--no-pseudo-weight"])
    saved = json.loads((tmp_path / "daformer_cost_cpu_mic_smoke.json").read_text())
    assert saved["settings"]["arch"] == "mit-b0" and saved["settings"]["crop"] == 32 and saved["settings"]["mic"]
    parts = saved["result"]["parts"]
    assert set(parts) == set(daformer_cost.PARTS)
    for name, entry in parts.items():
        assert entry["median_ms"] > 0 and len(entry["times_ms"]) == 2, name
    for name in ("instrumented_step", "teacher_step", "watch", "source_step"):
        assert saved["result"]["reference"][name]["median_ms"] > 0, name
    assert saved["peak_memory"] == {"teacher_step": "n/a (CPU)"}
    assert report["equivalence"]["identical"]  # the instrumented copy computes what teacher_step computes
    assert saved["machine"]["device"] == "cpu" and "torch" in saved["machine"]


def test_daformer_contrast_cost_smoke_times_every_configuration(tmp_path):
    """``python -m benchmarks.daformer_contrast_cost --smoke``: the recipe and each configuration of the issue-33
    study timed round-robin, each ratio against the recipe's step."""
    from benchmarks import daformer_contrast_cost
    from benchmarks.study.daformer_contrast import CONFIGS

    report = daformer_contrast_cost.main(["--smoke", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "daformer_contrast_cost_cpu_smoke.json").read_text())
    assert set(saved["result"]) == {"recipe", *CONFIGS} == set(report["result"])
    assert saved["result"]["recipe"]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 for r in saved["result"].values())
