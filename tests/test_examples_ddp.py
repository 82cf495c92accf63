"""examples/train_gta2cs.py under torchrun: 2 CPU processes (gloo) on the fixture data, then resumed in 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from examples_helpers import expected_last_line
from uda import model
from uda.datasets import cityscapes_files
from uda.demo import write_demo_dataset
from uda.loading import PseudoLabelSet
from PIL import Image

import protocl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_gta2cs.py")
CRASH = str(ROOT / "tests" / "examples_crash.py")  # the pipeline, ended after N steps (a simulated crash)
RUN = ["--source-iters", "4", "--rounds", "2", "--round-iters", "4", "--batch-size", "2", "--crop", "32",
       "--resize", "32", "--eval-size", "64x32", "--log-every", "2", "--ckpt-every", "2", "--workers", "0",
       "--threads", "1", "--diagnostics", "--round-decisions", "score"]  # decisions: scored on rank 0, broadcast


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "examples"), str(ROOT / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


@torch.no_grad()
def _check_merged_static_labels(out: Path, cs: Path) -> None:
    """Round 0's thresholds and labels from 2 shards equal one process over the whole split (source-only weights)."""
    net = model.TinySegNet(19)
    net.load_state_dict(torch.load(out / "source_only.pt", map_location="cpu", weights_only=False)["model"])
    net.eval()
    samples = cityscapes_files(cs, "train", require_labels=False)
    images = PseudoLabelSet(samples, resize=32)
    thresholds = protocl.ClassBalancedThresholds(19, proportion=0.1, sync=False)
    logits = []
    for i in range(len(images)):
        x = images[i]["image"][None]
        logits.append(F.interpolate(net(x)[0], size=x.shape[-2:], mode="bilinear", align_corners=False))
        thresholds.update(logits[-1])
    merged = json.loads((out / "pseudo_labels" / "round_00" / ".complete").read_text())["class_thresholds"]
    assert merged == thresholds.compute().tolist()
    for sample, lg in zip(samples, logits):
        expected = protocl.static_pseudo_label(lg, class_thresholds=thresholds.compute(), proportion=0.1)[0]
        written = np.asarray(Image.open(out / "pseudo_labels" / "round_00" / f"{sample.name}.png"))
        np.testing.assert_array_equal(written, expected.numpy())


def test_two_ranks_then_resume_in_one_process(tmp_path):
    gta, cs = write_demo_dataset(tmp_path / "data", seed=4, source_images=8, target_train=7,
                                 target_val=3, source_size=(72, 40), target_size=(64, 32))
    out = tmp_path / "out"
    data_args = ["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--arch", "tiny", "--out", str(out)]
    # 2 ranks: stage 1, sharded eval, sharded static labels (7 images: uneven shards), round 0, then a "crash"
    # in round 1 after its iteration 3 (last checkpoint: round 1, iteration 2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", CRASH, "11",
           *data_args, *RUN]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240, check=False)
    log = (out / "log.txt").read_text()
    assert "2 process(es)" in log, done.stdout + done.stderr
    assert "eval adapted round 0" in log, done.stdout + done.stderr
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    assert ckpt["world_size"] == 2
    assert done.returncode != 0  # the simulated crash
    assert (ckpt["phase"], ckpt["round"], ckpt["iteration"]) == ("adapt", 1, 2)
    # both ranks wrote their shard of static labels into one directory
    for r in range(2):
        labels = sorted((out / "pseudo_labels" / f"round_{r:02d}").glob("*.png"))
        assert len(labels) == 7
        assert set(np.unique(np.asarray(Image.open(labels[-1])))) <= set(range(19)) | {255}
    assert (out / "figures" / "pseudo_labels_round_00.png").is_file()
    _check_merged_static_labels(out, cs)
    assert bool(ckpt["contrast"]["source_ema.initialized"].any())

    # the 2-rank checkpoint resumes in one process and finishes
    resumed = subprocess.run([sys.executable, SCRIPT, *data_args, *RUN, "--resume", str(out / "checkpoint.pt")],
                             env=_env(), capture_output=True, text=True, timeout=240, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    last = resumed.stdout.strip().splitlines()[-1]
    assert last == expected_last_line(metrics)
    assert "checkpoint from 2 ranks resumed on 1" in resumed.stdout
    assert [r["round"] for r in metrics["rounds"]] == [0, 1]
    assert [e["round"] for e in metrics["round_decisions"]["rounds"]] == [0, 1]  # decided on 2 ranks, then 1
    # per-class label diagnostics summed over the ranks (round 0: 2 ranks; round 1: 2 ranks, then 1 process)
    assert [d["round"] for d in metrics["diagnostics"]] == [0, 1]
    for entry in metrics["diagnostics"]:
        counts = {kind: entry[kind]["counts"] for kind in ("static", "dynamic", "hybrid")}
        assert counts["static"]["gt"] == counts["dynamic"]["gt"] == counts["hybrid"]["gt"]
        for c in counts.values():
            assert all(0 <= cov <= gt for cov, gt in zip(c["covered"], c["gt"]))
            assert all(0 <= ok <= n for ok, n in zip(c["correct"], c["labelled"]))
    # 4 steps x 2 ranks x 2 crops of 32 x 32 target pixels in round 0; at least 26 of 32 rows of a crop are image
    # (the smallest scale, 0.8, makes the 32-pixel-high images 26 high), the rest is padding: so the sum is more
    # than one rank alone can count
    assert 4 * 1 * 2 * 32 * 32 < sum(metrics["diagnostics"][0]["static"]["counts"]["gt"]) <= 4 * 2 * 2 * 32 * 32
