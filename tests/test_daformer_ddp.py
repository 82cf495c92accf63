"""examples/train_daformer.py under torchrun: 2 CPU processes (gloo) on the fixture data keep ONE student
(DDP) and ONE EMA teacher (every rank updates its own copy from the same student), then a 2-rank run that
crashed is resumed in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from examples_helpers import load_checkpoint, write_fixture

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_daformer.py")
RANKS = str(ROOT / "tests" / "daformer_ranks.py")  # main's flow, then each rank saves; or a crash after N
# tests/test_train_daformer.py's TINY, without the control, with MIC
RUN = ["--arch", "mit-b0", "--iters", "6", "--warmup-iters", "2", "--batch-size", "2", "--crop", "32",
       "--source-resize", "40", "--resize", "32", "--eval-size", "64x32", "--log-every", "2",
       "--ckpt-every", "2", "--workers", "0", "--threads", "1", "--rcs-min-pixels", "20", "--no-check-data",
       "--no-control", "--mic", "--mic-block", "4"]
TIMEOUT = 300


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


def _torchrun(steps: int, args: list[str]) -> subprocess.CompletedProcess:
    """``tests/daformer_ranks.py STEPS args`` on 2 CPU processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RANKS,
           str(steps), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)


def _different(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [name for name in a if not torch.equal(a[name], b[name])]


def test_two_ranks_keep_one_teacher_then_resume_in_one_process(tmp_path):
    gta, cs = write_fixture(tmp_path / "data")

    def args(out: Path) -> list[str]:
        return ["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--out", str(out), *RUN]

    # 1. the whole run on 2 ranks: every rank ends with the same student and the same EMA teacher, bitwise
    out = tmp_path / "whole"
    done = _torchrun(0, args(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 process(es)" in (out / "log.txt").read_text()
    ranks = [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    teacher, student = ranks[0]["teacher"], ranks[0]["model"]
    assert len(teacher) > 100 and teacher.keys() == student.keys()
    assert _different(teacher, ranks[1]["teacher"]) == [], "the EMA teachers differ between ranks"
    assert _different(student, ranks[1]["model"]) == [], "the students differ between ranks"
    # the evaluation scored every shard with rank 0's BatchNorm statistics, the ones adapted.pt holds
    assert _different(ranks[0]["model_buffers"], ranks[1]["model_buffers"]) == []
    # not vacuous: every teacher parameter moved away from the initial weights; the teacher is not the student
    initial = load_checkpoint(out / "initial.pt")["model"]
    assert _different(teacher, {name: initial[name] for name in teacher}) == list(teacher)
    assert "decode_head.conv_seg.weight" in _different(teacher, student)
    # the checkpoint holds this teacher and student (rank 0's)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["phase"] == "done" and ckpt["world_size"] == 2
    assert _different(teacher, {name: ckpt["teacher"][name] for name in teacher}) == []
    assert _different(student, {name: ckpt["model"][name] for name in student}) == []

    # 2. a 2-rank run "crashes" after its 5th step (the last checkpoint: iteration 4) and resumes in 1 process
    out = tmp_path / "broken"
    crashed = _torchrun(5, args(out))
    assert crashed.returncode != 0, crashed.stdout + crashed.stderr  # the simulated crash
    assert "2 process(es)" in (out / "log.txt").read_text()
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert (ckpt["world_size"], ckpt["phase"], ckpt["iteration"], ckpt["step"]) == (2, "adapt", 4, 4)
    assert not (out / "adapted.pt").exists()
    resumed = subprocess.run([sys.executable, SCRIPT, *args(out), "--resume", str(out / "checkpoint.pt")],
                             env=_env(), capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    printed = resumed.stdout.strip().splitlines()
    assert "checkpoint from 2 ranks resumed on 1" in resumed.stdout
    assert "adapt, round 0, iteration 4" in resumed.stdout and "1 process(es)" in resumed.stdout
    assert "mean teacher it 6" in resumed.stdout and "mean teacher it 4" not in resumed.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed[-1].startswith("target mIoU: adapted")
    assert printed[-1] == (f"target mIoU: adapted {metrics['adapted']['miou']:.2f} "
                           "(no source-only control: --no-control)")
    assert (out / "adapted.pt").is_file() and load_checkpoint(out / "checkpoint.pt")["phase"] == "done"


def test_two_ranks_keep_one_contrast(tmp_path):
    """``--contrast`` under torchrun (issue 33): SePiCo's projection (idle before --contrast-start: DDP's unused
    parameters), class-balanced thresholds and prototype EMAs all-reduced, so every rank keeps the same student,
    teacher and prototypes."""
    gta, cs = write_fixture(tmp_path / "data")
    out = tmp_path / "run"
    extra = ["--contrast", "--contrast-features", "projection", "--contrast-dim", "16", "--contrast-labels",
             "class-balanced", "--hybrid-ce", "--contrast-start", "2"]
    done = _torchrun(0, ["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--out", str(out), *RUN, *extra])
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = [torch.load(out / f"rank{r}.pt", map_location="cpu", weights_only=True) for r in range(2)]
    for key in ("model", "teacher", "contrast"):
        assert _different(ranks[0][key], ranks[1][key]) == [], f"{key} differs between ranks"
    contrast = ranks[0]["contrast"]
    assert contrast["source_ema.initialized"].any() and contrast["target_ema.initialized"].any()
    assert "projection_head.out.weight" in ranks[0]["model"]
    log = (out / "log.txt").read_text()
    assert "fcl" in log and "bcl" in log
