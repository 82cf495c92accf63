"""examples/train_daformer.py (issue 32): the DAFormer-class trainer on the shared pipeline, run on tiny fixture
data: its reports and files, an exact resume, the refusals of bad input (nothing written), predict.py."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_daformer
import examples_helpers as helpers
from examples_helpers import assert_same_state, crash_after, load_checkpoint, write_fixture
from uda import daformer_options, mit
from uda.demo import write_folder
from uda.mean_teacher import CITYSCAPES_THING_NAMES
from uda.rare_class import RareClassStats


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "examples" / "train_daformer.py")
# a MiT-B0 on 32x32 crops of the 72x40 / 64x32 fixture: a few iterations of each phase
TINY = ["--arch", "mit-b0", "--iters", "6", "--warmup-iters", "2", "--batch-size", "2", "--crop", "32",
        "--source-resize", "40", "--resize", "32", "--eval-size", "64x32", "--log-every", "2", "--ckpt-every", "2",
        "--workers", "0", "--threads", "1", "--rcs-min-pixels", "20", "--no-check-data"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    return write_fixture(tmp_path_factory.mktemp("daformer_data"))


def argv(data, out: Path, *extra: str) -> list[str]:
    gta, cs = data
    return ["--gta5-root", str(gta), "--cityscapes-root", str(cs), "--out", str(out), *TINY, *extra]


def train_with(args: list[str], step_context=None) -> int:
    """``train_daformer.main`` with a ``step_context``: 0 when the run finished, 1 when it "crashed"."""
    return helpers.train_with(args, step_context, script=train_daformer, parse_args=daformer_options.parse_args)


def files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")) if out.exists() else []


def test_the_recipe_runs_and_ends_with_the_same_budget_control(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_daformer.main(argv(data, out)) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed[-1] == (f"target mIoU: source-only {metrics['source_only']['miou']:.2f} -> adapted "
                           f"{metrics['adapted']['miou']:.2f} (source-only = the same network on source alone for "
                           "the same 6 iterations from the same initial weights: the same-budget control)")
    for name in ("initial.pt", "adapted.pt", "source_only.pt", "checkpoint.pt", "rcs_stats.json"):
        assert (out / name).is_file(), name
    log = (out / "log.txt").read_text()
    assert "mean teacher it 6" in log and "source-only control it 6" in log and "pseudo-label weight" in log
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["phase"] == "done" and "contrast" not in ckpt and ckpt["config"]["recipe"] == "daformer"
    # the control started from the initial weights, the adapted model from the same ones
    initial = load_checkpoint(out / "initial.pt")["model"]
    adapted = load_checkpoint(out / "adapted.pt")["model"]
    control = load_checkpoint(out / "source_only.pt")["model"]
    key = "decode_head.conv_seg.weight"
    assert not torch.equal(initial[key], adapted[key]) and not torch.equal(adapted[key], control[key])
    # the network travels with the checkpoint: predict.py serves it
    preds = tmp_path / "preds"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "predict.py"), "--checkpoint",
                           str(out / "adapted.pt"), "--dataset", "cityscapes", "--root", str(data[1]), "--split",
                           "val", "--out", str(preds)], capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{metrics['adapted']['miou']:.2f}" in done.stdout  # the same whole-image evaluation


def test_rare_class_statistics_are_cached_and_reused(data, tmp_path):
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--no-control", "--iters", "2")) == 0
    stats = RareClassStats.load(out / "rcs_stats.json")
    assert stats.num_classes == 19 and len(stats.files) == 6 and stats.counts.sum() > 0
    mark = (out / "rcs_stats.json").stat().st_mtime_ns
    assert train_with(argv(data, out, "--no-control", "--iters", "4", "--resume", "auto")) == 0
    assert (out / "rcs_stats.json").stat().st_mtime_ns == mark  # restored on resume, not counted again


def test_a_crash_resumes_exactly(data, tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    extra = ("--mic", "--mic-block", "4", "--no-control")
    assert train_with(argv(data, whole, *extra)) == 0
    assert train_with(argv(data, broken, *extra), crash_after(5)) == 1  # the last checkpoint: iteration 4
    assert load_checkpoint(broken / "checkpoint.pt")["iteration"] == 4
    assert train_with(argv(data, broken, *extra, "--resume", "auto")) == 0
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(broken / "checkpoint.pt")
    for key in ("model", "teacher", "optimizer", "rng", "streams", "metrics"):
        assert_same_state(a[key], b[key], key)


def test_the_teacher_follows_the_student_by_ema(data, tmp_path):
    """After each step the teacher is alpha_t * teacher + (1 - alpha_t) * student of the step before
    (DAFormer updates it first thing in the step)."""
    out = tmp_path / "run"
    run = train_daformer.setup(daformer_options.parse_args(argv(data, out, "--no-control", "--iters", "3")))
    state = train_daformer.start(run)
    seen = []

    @contextlib.contextmanager
    def record(kind, checked):
        seen.append(({k: v.clone() for k, v in run.model.named_parameters()},
                     {k: v.clone() for k, v in run.teacher.named_parameters()}))
        yield

    train_daformer.train_teacher(run, state, step_context=record)
    teacher = dict(run.teacher.named_parameters())
    student, before = seen[2]
    alpha = min(1 - 1 / 3, 0.999)  # the third step: iteration 2
    for name, value in teacher.items():
        torch.testing.assert_close(value, alpha * before[name] + (1 - alpha) * student[name], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(seen[1][1][k], seen[0][0][k]) for k in teacher)  # step 0 copied the student


def test_a_crop_that_is_not_a_multiple_of_32_is_refused(data, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="multiple of 32.*got 48; use --crop 64"):
        daformer_options.parse_args(argv(data, out, "--crop", "48"))
    assert not out.exists()
    # MIC: a grid of at least 8 x 8 blocks (a crop masked whole gives NaN gradients in a MiT from scratch)
    with pytest.raises(SystemExit, match="at least 8 blocks a side.*use --mic-block 4"):
        daformer_options.parse_args(argv(data, out, "--mic", "--mic-block", "16"))
    assert daformer_options.parse_args(argv(data, out, "--mic", "--mic-block", "4")).mic_block == 4


@pytest.mark.parametrize("kind", ["wrong size", "deeplab"])
def test_a_wrong_init_file_is_refused_and_nothing_is_written(data, tmp_path, capsys, kind):
    path = tmp_path / "init.pth"
    if kind == "wrong size":
        state = mit.build_mit("mit-b1").state_dict()
        state["head.weight"] = torch.zeros(1000, 512)
    else:  # a torchvision ResNet's layout
        state = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                 "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1), "fc.weight": torch.zeros(1000, 2048)}
    torch.save(state, path)
    out = tmp_path / "run"
    assert train_daformer.main(argv(data, out, "--init", str(path))) == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(path) in err
    assert ("mit-b1" in err.lower() or "b1" in err) if kind == "wrong size" else "MiT" in err
    assert files(out) == []


def test_a_checkpoint_of_another_k_or_script_is_refused_and_nothing_is_written(data, tmp_path, capsys):
    first = tmp_path / "first"
    assert train_with(argv(data, first, "--no-control", "--iters", "2")) == 0
    folder = tmp_path / "folder"
    source, target, table = write_folder(folder)
    out = tmp_path / "other"
    args = ["--source", "folder", "--target", "folder", "--source-root", str(source), "--target-root", str(target),
            "--class-table", str(table), "--out", str(out), *TINY[:-1], "--resume", str(first / "checkpoint.pt")]
    assert train_daformer.main(args) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "num_classes" in err
    assert files(out) == []
    # a train_gta2cs.py checkpoint is not resumed here
    gta = tmp_path / "gta.pt"
    ckpt = load_checkpoint(first / "checkpoint.pt")
    ckpt["config"].pop("recipe")
    torch.save(ckpt, gta)
    out = tmp_path / "third"
    assert train_daformer.main(argv(data, out, "--resume", str(gta))) == 2
    assert "a checkpoint of train_daformer.py, got one of train_gta2cs.py" in capsys.readouterr().err
    assert files(out) == []


def test_options_are_daformers_defaults_and_the_demos():
    real = daformer_options.parse_args(["--gta5-root", "g", "--cityscapes-root", "c", "--init", "mit_b5.pth"])
    assert (real.arch, real.iters, real.warmup_iters, real.lr, real.batch_size, real.crop) == (
        "mit-b5", 40000, 1500, 6e-5, 2, 512)
    assert (real.source_resize, real.resize, tuple(real.eval_size), real.ignore_rows) == (720, 512, (1024, 512),
                                                                                           [15, 120])
    assert (real.teacher_alpha, real.pseudo_threshold, real.fd_lambda, real.rcs_temperature) == (
        0.999, 0.968, 0.005, 0.01)
    assert real.control and not real.mic and real.recipe == "daformer"
    demo = daformer_options.parse_args([])
    assert demo.demo and demo.arch == "mit-b0" and demo.crop % 32 == 0 and demo.fd_lambda == 0.0
    other = daformer_options.parse_args(["--source", "cityscapes", "--target", "acdc", "--cityscapes-root", "c",
                                         "--acdc-root", "a"])
    assert other.ignore_rows == [0, 0]  # the rows describe Cityscapes' crops


def segformer_file(path: Path, arch: str = "mit-b0") -> Path:
    """A SegFormer ``mit_b*.pth`` in the released layout (random weights, the ImageNet head included)."""
    encoder = mit.build_mit(arch)
    state = encoder.state_dict()
    state["head.weight"], state["head.bias"] = torch.zeros(1000, encoder.out_channels[-1]), torch.zeros(1000)
    torch.save({"state_dict": state}, path)
    return path


def test_the_feature_distance_pulls_towards_the_initial_encoder(data, tmp_path):
    init = segformer_file(tmp_path / "mit_b0.pth")
    out = tmp_path / "run"
    args = daformer_options.parse_args(argv(data, out, "--init", str(init), "--no-control", "--iters", "2"))
    assert args.fd_lambda == 0.005
    run = train_daformer.setup(args)
    assert "head" in (out / "log.txt").read_text()  # the ImageNet head dropped, and said
    frozen = {k: v.clone() for k, v in run.imnet.state_dict().items()}
    assert all(torch.equal(v, run.model.backbone.state_dict()[k]) for k, v in frozen.items())
    state = train_daformer.start(run)
    train_daformer.train(run, state)
    assert " fd " in (out / "log.txt").read_text()
    assert all(torch.equal(v, run.imnet.state_dict()[k]) for k, v in frozen.items())  # frozen
    assert not all(torch.equal(v, run.model.backbone.state_dict()[k]) for k, v in frozen.items())
    assert tuple(run.table.names[c] for c in run.things) == CITYSCAPES_THING_NAMES


@pytest.mark.parametrize("extra", [
    ("--amp", "bf16"),
    ("--no-mix", "--jitter", "0", "--no-blur", "--rcs-temperature", "0", "--no-pseudo-weight", "--ignore-rows", "0",
     "0"),
])
def test_precision_and_ablations_run(data, tmp_path, extra):
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--no-control", "--iters", "2", *extra)) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["adapted"]["miou"] <= 100.0
    assert (out / "rcs_stats.json").is_file() == ("--rcs-temperature" not in extra)


def test_unknown_thing_classes_are_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_daformer.main(argv(data, out, "--thing-classes", "car", "unicorn")) == 2
    assert "expected --thing-classes among the class table's names" in capsys.readouterr().err
    assert files(out) == []


def test_target_train_labels_are_never_opened(data, tmp_path):
    """DAFormer's first release cropped target images with cat_max_ratio, which reads their ground truth
    (DAFormer#6); here a target train label that cannot be read changes nothing."""
    import shutil

    gta, cs = data
    copy = tmp_path / "cs"
    shutil.copytree(cs, copy)
    for label in (copy / "gtFine" / "train").rglob("*.png"):
        label.write_bytes(b"not a png")
    out = tmp_path / "run"
    args = ["--gta5-root", str(gta), "--cityscapes-root", str(copy), "--out", str(out), *TINY, "--no-control",
            "--iters", "2"]
    assert train_with(args) == 0


@pytest.mark.needs_cuda
@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_the_step_never_synchronises_on_cuda(data, tmp_path, amp):
    """Every step but the first of each phase under torch.cuda.set_sync_debug_mode("error"), MIC included."""
    out = tmp_path / "run"
    assert train_with(argv(data, out, "--device", "cuda", "--sync-debug", "--amp", amp, "--mic", "--mic-block",
                           "4", "--iters", "4")) == 0


def test_mic_masks_with_the_networks_mean_colour(data, tmp_path):
    """MIC multiplies normalised images by its mask: a masked pixel is the mean colour, 0 after normalising."""
    run = train_daformer.setup(daformer_options.parse_args(argv(data, tmp_path / "run", "--no-control")))
    images = torch.rand(2, 3, 32, 32) * 255
    blank = train_daformer.blank(run, images)
    assert blank.shape == images.shape
    torch.testing.assert_close(run.model.normalize(blank), torch.zeros_like(images), atol=1e-5, rtol=0)


def test_the_recipe_also_trains_the_tiny_cnn(data, tmp_path):
    """``--arch tiny`` (and deeplabv2) under DAFormer's recipe: AdamW over the network's own groups."""
    args = argv(data, tmp_path / "run", "--no-control", "--iters", "2")
    args[args.index("--arch") + 1] = "tiny"
    run = train_daformer.setup(daformer_options.parse_args(args))
    assert isinstance(run.optimizer, torch.optim.AdamW) and run.imnet is None
    assert [g["base_lr"] for g in run.optimizer.param_groups] == [args_lr := run.args.lr, 10 * args_lr]
    state = train_daformer.start(run)
    train_daformer.train(run, state)
    assert state["metrics"]["adapted"]["miou"] >= 0.0
