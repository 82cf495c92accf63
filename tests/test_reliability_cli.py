"""``examples/train_gta2cs.py`` as a user on a shared cluster runs it (a subprocess on a tiny fixture in the real
dataset layouts): hostile files for every option that loads one, bad images and labels, SIGTERM then
``--resume auto``, a non-finite loss, an unwritable output folder.

Exit statuses (docs/reproduce.md): 0 done; 1 failure during training (a bad file with ``--on-bad-sample
error``, a non-finite loss); 2 bad input found before training (arguments, files, pre-flight check, output
folder); 75 stopped by SIGTERM/SIGUSR1 with the checkpoint written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from examples_helpers import TINY_RUN, data_args, write_fixture
from uda.datasets import cityscapes_files, gta5_files
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train_gta2cs.py"


class Hostile:
    """Unpickling this calls ``os.mkdir(marker)``: harmless, and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAIN), *args], capture_output=True, text=True, timeout=timeout,
                          check=False)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` line the script ends with (stderr also carries the pre-flight check's progress bar)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert lines, result.stderr
    return lines[-1]


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    write_fixture(root)
    return root


@pytest.fixture
def roots(clean, tmp_path) -> tuple[Path, Path]:
    """A fresh copy of the fixture, to spoil."""
    shutil.copytree(clean, tmp_path / "data")
    return tmp_path / "data" / "gta5", tmp_path / "data" / "cityscapes"


def truncate(path: Path, size: int = 300) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


# ---------------------------------------------------------------------------------------------- loading
def test_pipeline_checkpoints_load_safely(roots, tmp_path):
    out = tmp_path / "out"
    result = run(data_args(*roots, out) + TINY_RUN)
    assert result.returncode == 0, result.stderr
    for name in ("checkpoint.pt", "source_only.pt", "adapted.pt"):
        torch.load(out / name, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("option", ["--resume", "--source-checkpoint"])
def test_hostile_checkpoint_never_runs(roots, tmp_path, option):
    marker = tmp_path / "marker"
    shared = tmp_path / "shared.pt"
    torch.save({"model": {"x": Hostile(marker)}}, shared)
    result = run(data_args(*roots, tmp_path / "out") + TINY_RUN + [option, str(shared)])
    assert not marker.exists(), "the pickle ran code"
    assert result.returncode == 2, result.stderr
    err = error_line(result)
    assert err.startswith(f"error: expected {option} {str(shared)!r}") and "posix.mkdir" in err, err
    assert "Traceback" not in result.stderr


def test_hostile_init_never_runs(roots, tmp_path):
    marker = tmp_path / "marker"
    shared = tmp_path / "resnet101.pth"
    torch.save({"conv1.weight": Hostile(marker)}, shared)
    result = run(data_args(*roots, tmp_path / "out")[:-4] + ["--out", str(tmp_path / "out"), "--arch", "deeplabv2",
                                                            "--init", str(shared), *TINY_RUN])
    assert not marker.exists(), "the pickle ran code"
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    err = error_line(result)
    assert err.startswith(f"error: expected --init {str(shared)!r}") and "posix.mkdir" in err, err


# ---------------------------------------------------------------------------------------------- bad data
def test_bad_files_are_all_found_before_training(roots, tmp_path):
    gta, cs = roots
    src, val = gta5_files(gta), cityscapes_files(cs, "val")
    bad_image = truncate(src[1].image)
    bad_val = truncate(val[0].image)
    rgb = src[2].label
    Image.open(rgb).convert("RGB").save(rgb)  # a colour rendering where an id map belongs
    wrong_size = src[3].label
    Image.new("L", (40, 72), 7).save(wrong_size)  # the image is 72x40
    instance = src[4].label
    Image.fromarray(np.full((40, 72), 26001, np.uint16)).save(instance)  # instance ids: out of the 8-bit range
    out = tmp_path / "out"
    result = run(data_args(gta, cs, out) + TINY_RUN)
    assert result.returncode == 2, result.stderr
    assert "pre-flight data check: 5 bad file(s)" in result.stderr
    for path in (bad_image, bad_val, rgb, wrong_size, instance):
        assert str(path) in result.stderr
    assert " it 1 " not in result.stdout and not (out / "checkpoint.pt").exists()  # nothing trained


@pytest.mark.parametrize("workers", ["0", pytest.param("2", marks=pytest.mark.slow)])
def test_truncated_image_during_training_is_named(roots, tmp_path, workers):
    """Also from DataLoader worker processes, which then go with the main process (no hang at exit)."""
    gta, cs = roots
    bad = truncate(gta5_files(gta)[2].image)
    result = run(data_args(gta, cs, tmp_path / "out") + TINY_RUN + ["--no-check-data", "--workers", workers],
                 timeout=120)
    assert result.returncode == 1
    last = error_line(result)
    assert str(bad) in last and "does not decode" in last and "Traceback" not in result.stderr, result.stderr


def test_skipped_files_are_logged_and_counted(roots, tmp_path):
    gta, cs = roots
    bad = truncate(gta5_files(gta)[2].image)
    out = tmp_path / "out"
    result = run(data_args(gta, cs, out) + TINY_RUN + ["--no-check-data", "--on-bad-sample", "skip"])
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    skipped = metrics["bad_samples"]
    assert skipped["skipped"] > 0 and skipped["files"] == [str(bad)]
    assert f"warning: skipped {str(bad)!r}" in (out / "log.txt").read_text()


# ---------------------------------------------------------------------------------------------- preemption
STOP_RUN = ["--source-iters", "120", "--rounds", "2", "--round-iters", "60", "--batch-size", "2", "--crop", "32",
            "--resize", "32", "--eval-size", "64x32", "--log-every", "5", "--ckpt-every", "1000", "--workers", "0",
            "--threads", "1", "--resume", "auto"]


def _metrics(out: Path) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["config"].pop("out")
    return metrics


def test_sigterm_then_resume_auto_is_exact(roots, tmp_path):
    """Stopped by SIGTERM in the middle of a round (checkpoints every 1000 iterations: the stop's checkpoint is the
    only one there), then the same command again: the same metrics.json as a run that was never stopped."""
    args = data_args(*roots, tmp_path / "stopped") + STOP_RUN
    proc = subprocess.Popen([sys.executable, str(TRAIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "stage 2 round 0 it 10 " in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest, err = proc.communicate(timeout=300)
    log = "".join(seen) + rest
    assert proc.returncode == 75, (log, err)
    assert "stop requested (SIGTERM)" in log and "checkpoint written" in log
    state = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert (state["phase"], state["round"]) == ("adapt", 0) and 10 <= state["iteration"] < 60
    assert "pre-flight data check" in log
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed {tmp_path / 'stopped' / 'checkpoint.pt'}" in resumed.stdout
    assert "pre-flight data check" not in resumed.stdout  # not repeated on resume
    reference = run(data_args(*roots, tmp_path / "reference") + STOP_RUN)
    assert reference.returncode == 0, reference.stderr
    assert _metrics(tmp_path / "stopped") == _metrics(tmp_path / "reference")


# ---------------------------------------------------------------------------------------------- divergence
def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(roots, tmp_path):
    first = tmp_path / "first"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples"), str(ROOT / "tests")])}
    crashed = subprocess.run([sys.executable, str(ROOT / "tests" / "examples_crash.py"), "5",  # "dies" after step 5
                              *data_args(*roots, first), *TINY_RUN], capture_output=True, text=True, env=env,
                             timeout=300, check=False)
    assert crashed.returncode == 1, crashed.stderr  # its last checkpoint: iteration 4
    ckpt = torch.load(first / "checkpoint.pt", weights_only=True)
    assert (ckpt["phase"], ckpt["iteration"]) == ("source", 4)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    ckpt["model"][name].view(-1)[0] = float("nan")  # the injected divergence: the next loss is NaN
    out = tmp_path / "out"
    out.mkdir()
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    result = run(data_args(*roots, out) + TINY_RUN + ["--resume", "auto"])
    assert result.returncode == 1, result.stderr
    last = error_line(result)
    assert last.startswith("error: non-finite ce_src (NaN or inf) at iteration 5"), result.stderr
    assert str(out / "checkpoint.pt") in last
    assert (out / "checkpoint.pt").read_bytes() == before  # never overwritten by the non-finite state
    assert not (out / "checkpoint.pt.tmp").exists()


def test_non_finite_source_checkpoint_is_refused(roots, tmp_path):
    first = tmp_path / "first"
    assert run(data_args(*roots, first) + TINY_RUN).returncode == 0
    weights = torch.load(first / "source_only.pt", weights_only=True)
    name = next(k for k, v in weights["model"].items() if v.is_floating_point())
    weights["model"][name].view(-1)[0] = float("inf")
    torch.save(weights, tmp_path / "diverged.pt")
    out = tmp_path / "out"
    result = run(data_args(*roots, out) + TINY_RUN + ["--source-checkpoint", str(tmp_path / "diverged.pt")])
    assert result.returncode == 2, result.stderr
    err = error_line(result)
    assert err.startswith(f"error: expected --source-checkpoint {str(tmp_path / 'diverged.pt')!r} to hold "
                          "finite weights") and name in err, err
    assert not (out / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------------------------- output folder
def test_unwritable_out_is_refused_before_training(roots, tmp_path):
    """``--out`` under a regular file: it can never be created, whoever runs (root ignores chmod 555, so a
    read-only folder would not test anything here)."""
    blocker = tmp_path / "somefile"
    blocker.write_text("a file, not a folder")
    out = blocker / "sub"
    result = run(data_args(*roots, out) + TINY_RUN)
    assert result.returncode == 2, result.stderr
    assert error_line(result).startswith(f"error: expected --out to be a folder that can be created, got {str(out)!r}")
    assert "Traceback" not in result.stderr


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


@pytest.mark.slow
def test_stop_on_one_rank_stops_both_in_step(clean, tmp_path):
    """Under torchrun (2 CPU ranks, gloo), SIGUSR1 reaches rank 1 only: both ranks stop after the same step, one
    checkpoint is written, each rank exits with 75; resumed with --resume auto, the run ends with the
    metrics.json of a run that was never stopped."""
    gta, cs = clean / "gta5", clean / "cityscapes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples"), env.get("PYTHONPATH", "")])

    def torchrun(out: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN),
                *data_args(gta, cs, out), *STOP_RUN, "--no-check-data"]

    proc = subprocess.Popen(torchrun(tmp_path / "stopped"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, bufsize=1, env=env)
    for line in proc.stdout:
        if "stage 2 round 0 it 10 " in line:
            workers = sorted(_children(proc.pid))
            assert len(workers) == 2, workers
            os.kill(workers[1], signal.SIGUSR1)  # the second one started: local rank 1
            break
    _, err = proc.communicate(timeout=300)
    log = (tmp_path / "stopped" / "log.txt").read_text()
    assert "stop requested (a signal on another rank)" in log or "stop requested (SIGUSR1)" in log, log
    assert "stop requested (a signal on another rank)" in log  # rank 0 (the log) was not signalled itself
    # torchrun's report lists the ranks it saw exited at one poll (every 0.1 s), then SIGTERMs the others: each
    # listed rank ended with 75, and none was killed (a stopped rank ignores that SIGTERM, see StopRequest)
    exits = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\n\s*exitcode\s*: (-?\d+)", err)
    assert exits and {code for _, code in exits} == {"75"}, err
    ckpt = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and (ckpt["phase"], ckpt["round"]) == ("adapt", 0) and ckpt["iteration"] >= 10
    resumed = subprocess.run(torchrun(tmp_path / "stopped"), capture_output=True, text=True, env=env, timeout=300,
                             check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reference = subprocess.run(torchrun(tmp_path / "reference"), capture_output=True, text=True, env=env,
                               timeout=300, check=False)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert _metrics(tmp_path / "stopped") == _metrics(tmp_path / "reference")
