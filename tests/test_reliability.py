"""Reliability pieces of the reference pipeline, unit by unit: safe loading, RNG states, atomic saves, bad data
(named, skipped, found by the pre-flight check), stop requests, the non-finite guard, the output folder and
``--resume auto``. The end-to-end behaviour of ``examples/train_gta2cs.py`` is in test_reliability_cli.py."""

from __future__ import annotations

import argparse
import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from examples_helpers import write_fixture
from uda import checkpoint, preflight, runtime
from uda.classes import CITYSCAPES
from uda.datasets import cityscapes_files, gta5_files, synthia_files
from uda.labels import BadSampleError, read_label
from uda.loading import EvalSet, PseudoLabelSet, TrainSet
from uda.stream import WORKER_GRACE_S, BatchStream
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import protocl

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(EXAMPLES), os.environ.get("PYTHONPATH", "")])}


class Hostile:
    """Unpickling this calls ``os.mkdir(marker)``: harmless, and visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def hostile_file(path: Path, marker: Path, layout: str = "model") -> Path:
    payload = {"model": {"weight": torch.zeros(2), "x": Hostile(marker)}} if layout == "model" else Hostile(marker)
    torch.save(payload, path)
    return path


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("option", ["--resume", "--source-checkpoint", "source_only.pt"])
def test_hostile_pickle_is_refused_and_never_runs(tmp_path, option):
    marker = tmp_path / "marker"
    path = hostile_file(tmp_path / "shared.pt", marker)
    # the control: an unsafe load does run it (so the check below can fail)
    torch.load(path, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    with pytest.raises(ValueError) as info:
        checkpoint.load(path, option)
    message = str(info.value)
    assert str(path) in message and option in message
    assert f"{os.mkdir.__module__}.mkdir" in message  # what it held: the global the safe loader refused
    assert not marker.exists()


def test_unreadable_checkpoints_are_named(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.arange(1000.0)}}, good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for path in (truncated, empty):
        with pytest.raises(ValueError, match="truncated or another format") as info:
            checkpoint.load(path, "--resume")
        assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="not a file"):
        checkpoint.load(tmp_path / "missing.pt")
    assert torch.equal(checkpoint.load(good)["model"]["w"], torch.arange(1000.0))


def test_objects_beyond_plain_values_are_named(tmp_path):
    path = tmp_path / "ns.pt"
    torch.save({"config": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(ValueError, match=r"argparse\.Namespace"):
        checkpoint.load(path, "--resume")


def _draws():
    return (random.random(), random.gauss(0, 1), np.random.random(3).tolist(), np.random.standard_normal(),
            torch.rand(3).tolist())


def test_rng_state_is_plain_and_round_trips_exactly(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's state (gauss_next)
    np.random.standard_normal()  # and one in NumPy's (has_gauss, cached_gaussian)
    state = checkpoint.rng_state()
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save({"rng": state}, path)
    loaded = checkpoint.load(path)["rng"]  # weights_only=True reads it
    assert isinstance(loaded["numpy"]["keys"], torch.Tensor) and isinstance(loaded["python"]["state"], list)
    _draws()
    _draws()
    checkpoint.set_rng_state(loaded)
    assert _draws() == expected


def test_to_primitives():
    ns = argparse.Namespace(size=(1460, 730), out=Path("/runs/x"), scales=[0.8, 1.0], n=np.int64(3),
                            nested={"a": (1, Path("b"))}, flag=True, none=None)
    assert checkpoint.to_primitives(ns) == {"size": [1460, 730], "out": "/runs/x", "scales": [0.8, 1.0], "n": 3,
                                            "nested": {"a": [1, "b"]}, "flag": True, "none": None}
    assert type(checkpoint.to_primitives(ns)["n"]) is int
    with pytest.raises(TypeError, match=r"config\.bad\[1\].*object"):
        checkpoint.to_primitives({"bad": [1, object()]})


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, code):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def failing_save(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint.torch, "save", failing_save)
    with pytest.raises(OSError) as info:
        checkpoint.save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    assert info.value.errno == code and str(path) in str(info.value) and "previous checkpoint is kept" in str(info.value)
    assert path.read_bytes() == before
    assert not path.with_name("checkpoint.pt.tmp").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# ---------------------------------------------------------------------------------------------- data
@pytest.fixture
def roots(tmp_path):
    return write_fixture(tmp_path / "data")


def truncate(path: Path, size: int = 300) -> Path:
    path.write_bytes(path.read_bytes()[:size])
    return path


def test_ignore_is_protocl_ignore_index():
    # the class tables (every label format reads through one) map unlisted ids and the train-id files' ignore to
    # protocl's ignore index
    assert CITYSCAPES.lut()[0] == protocl.IGNORE_INDEX == 255
    assert CITYSCAPES.train_id_table().ignore_ids == (protocl.IGNORE_INDEX,)


def test_truncated_image_is_named_by_every_reader(roots):
    gta, _ = roots
    samples = gta5_files(gta)
    bad = truncate(samples[2].image)
    readers = [lambda: TrainSet(samples, resize=32, crop=32)[(2, 7)],
               lambda: EvalSet(samples, size=(64, 32))[2],
               lambda: PseudoLabelSet(samples, resize=32)[2]]
    for read in readers:
        with pytest.raises(ValueError, match="does not decode") as info:
            read()
        assert isinstance(info.value, BadSampleError) and str(bad) in str(info.value)


def test_error_from_a_worker_process_names_the_file(roots):
    gta, _ = roots
    samples = gta5_files(gta)
    bad = truncate(samples[0].image)
    stream = BatchStream(TrainSet(samples, resize=32, crop=32), 6, seed=0, stream=0, workers=1)
    with pytest.raises(ValueError) as info:
        next(stream)
    assert str(bad) in str(info.value) and "does not decode" in str(info.value)


def _label(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)
    return path


def test_label_mode_range_and_size_are_checked(tmp_path):
    ids = np.full((4, 8), 7, np.uint8)
    rgb = _label(tmp_path / "rgb.png", np.zeros((4, 8, 3), np.uint8))
    with pytest.raises(BadSampleError, match=r"got mode RGB \(a colour rendering\?\)") as info:
        read_label(rgb, (8, 4))
    assert str(rgb) in str(info.value)
    instance = tmp_path / "instance.png"
    Image.fromarray(np.full((4, 8), 26001, np.uint16)).save(instance)  # *_gtFine_instanceIds.png: id*1000+k
    assert Image.open(instance).mode.startswith("I")
    with pytest.raises(BadSampleError, match=r"0-255.*got 26001 on 32 pixels"):
        read_label(instance, (8, 4))
    small_ok = Image.open(_label(tmp_path / "ok16.png", np.full((4, 8), 26, np.uint16)))
    assert small_ok.mode.startswith("I") and (read_label(Path(small_ok.filename), (8, 4)) == 13).all()
    transposed = _label(tmp_path / "t.png", np.full((8, 4), 7, np.uint8))
    with pytest.raises(BadSampleError, match=r"size 4x8 does not match its image 'img.png' of 8x4"):
        read_label(transposed, (8, 4), image_path="img.png")
    # a rescale of the same aspect ratio is allowed and resized nearest (a few GTA5 labels)
    half = _label(tmp_path / "half.png", np.array([[7, 26], [24, 0]], np.uint8))
    np.testing.assert_array_equal(read_label(half, (4, 4)), np.kron([[0, 13], [11, 255]], np.ones((2, 2))))
    assert (read_label(_label(tmp_path / "ids.png", ids), (8, 4)) == 0).all()


def test_synthia_labels_must_be_16_bit_rgb(tmp_path):
    eight = _label(tmp_path / "0000000.png", np.zeros((4, 8, 3), np.uint8))
    with pytest.raises(BadSampleError, match=r"16-bit RGB PNG.*got 8-bit mode RGB") as info:
        read_label(eight, (8, 4), "synthia")
    assert str(eight) in str(info.value)
    grey = _label(tmp_path / "0000001.png", np.zeros((4, 8), np.uint8))
    with pytest.raises(BadSampleError, match=r"16-bit RGB PNG.*got 8-bit mode L"):
        read_label(grey, (8, 4), "synthia")


def test_skip_replaces_a_bad_sample_by_the_next_one(roots):
    gta, _ = roots
    samples = gta5_files(gta)
    bad = truncate(samples[3].image)
    strict = TrainSet(samples, resize=32, crop=32, scales=(0.8, 1.2))
    skip = TrainSet(samples, resize=32, crop=32, scales=(0.8, 1.2), on_bad_sample="skip")
    got, expected = skip[(3, 99)], strict[(4, 99)]  # the next index, under the same seed
    assert torch.equal(got["image"], expected["image"]) and torch.equal(got["label"], expected["label"])
    assert int(got["skipped"]) == 1 and str(bad) in got["skipped_files"] and int(got["index"]) == 4
    good = skip[(1, 5)]
    assert int(good["skipped"]) == 0 and good["skipped_files"] == ""
    assert torch.equal(good["image"], strict[(1, 5)]["image"])
    truncate(samples[5].image)  # the last one: wraps around to index 0
    assert int(skip[(5, 1)]["index"]) == 0
    # batches count the skips; the order and contents do not depend on the run (resume stays exact)
    stream = BatchStream(skip, 6, seed=0, stream=0)
    batch = next(stream)
    assert int(batch["skipped"].sum()) == 2 and sum(bool(f) for f in batch["skipped_files"]) == 2
    for sample in samples:
        truncate(sample.image)
    with pytest.raises(BadSampleError, match="every one of the 6 samples is bad"):
        skip[(0, 0)]
    with pytest.raises(ValueError, match=r"on_bad_sample in \('error', 'skip'\), got 'ignore'"):
        TrainSet(samples, resize=32, crop=32, on_bad_sample="ignore")


def test_skip_in_evaluation_leaves_the_sample_out(roots):
    _, cs = roots
    samples = cityscapes_files(cs, "val")
    bad = truncate(samples[1].image)
    item = EvalSet(samples, size=(64, 32), on_bad_sample="skip")[1]
    assert (item["label"] == protocl.IGNORE_INDEX).all() and int(item["skipped"]) == 1 and str(bad) in item["skipped_files"]
    pseudo = PseudoLabelSet(samples, resize=32, on_bad_sample="skip")[1]
    assert int(pseudo["skipped"]) == 1 and str(bad) in pseudo["skipped_files"]


def test_workers_ignore_stop_signals():
    script = textwrap.dedent("""
        import os, signal, sys
        from uda.stream import ignore_stop_signals
        ignore_stop_signals(0)
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        print("alive", signal.alarm(0))  # SIGTERM: still alive, gone WORKER_GRACE_S later
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False,
                         env=EXAMPLES_ENV)
    assert out.returncode == 0 and out.stdout.split()[0] == "alive", out.stderr
    assert 0 < int(out.stdout.split()[1]) <= WORKER_GRACE_S


# ---------------------------------------------------------------------------------------------- pre-flight
def _splits(gta: Path, cs: Path) -> dict:
    return {"gta5": gta5_files(gta), "cityscapes train": cityscapes_files(cs, "train", require_labels=False),
            "cityscapes val": cityscapes_files(cs, "val")}


def test_preflight_passes_good_data_and_measures(roots):
    gta, cs = roots
    lines = []
    stats = preflight.check_data(_splits(gta, cs), workers=0, progress=False, log=lines.append)
    assert stats["samples"] == 6 + 6 + 3 and stats["files"] == 2 * 15 and stats["bytes"] > 0
    assert len(lines) == 1 and "30 files" in lines[0]


def test_preflight_lists_every_bad_file_with_its_reason(roots):
    gta, cs = roots
    src = gta5_files(gta)
    val = cityscapes_files(cs, "val")
    truncated = truncate(src[0].image)
    not_png = src[1].image
    not_png.write_bytes(b"this is not an image")
    rgb = src[2].label
    Image.open(rgb).convert("RGB").save(rgb)  # a colour rendering where an id map belongs
    with Image.open(src[3].label) as label:
        w, h = label.size
    wrong_size = src[3].label
    Image.new("L", (h, w), 7).save(wrong_size)  # transposed: another aspect ratio
    instance = val[0].label
    Image.fromarray(np.full((4, 4), 26001, np.uint16)).save(instance)
    # allowed: a rescale of the same aspect ratio (resized nearest when read)
    with Image.open(src[4].label) as label:
        label.resize((w * 2, h * 2), Image.NEAREST).save(src[4].label)
    results = []
    for workers in (2, 0):
        with pytest.raises(ValueError) as info:
            preflight.check_data(_splits(gta, cs), workers=workers, progress=False)
        results.append(str(info.value))
    assert results[0] == results[1]  # the same report in parallel and in-process
    message = results[0]
    assert message.startswith("pre-flight data check: 5 bad file(s)")
    for path, reason in ((truncated, "does not decode"), (not_png, "does not decode"), (rgb, "got mode RGB"),
                         (wrong_size, "does not match its image"), (instance, "got 26001")):
        line = next(line for line in message.splitlines() if str(path) in line)
        assert reason in line, line
    assert str(src[4].label) not in message and "--no-check-data" in message


def test_preflight_checks_synthia_labels(tmp_path):
    syn, _ = write_fixture(tmp_path, source="synthia")
    samples = synthia_files(syn)
    preflight.check_data({"synthia": samples}, workers=0, progress=False)
    Image.new("RGB", (72, 40)).save(samples[0].label)  # 8-bit: the class ids would be lost
    with pytest.raises(ValueError, match=r"16-bit RGB PNG"):
        preflight.check_data({"synthia": samples}, workers=0, progress=False)


# ---------------------------------------------------------------------------------------------- stop requests
def test_stop_request_flags_signals_and_restores_handlers():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
    try:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with runtime.StopRequest() as stop:
                assert stop.installed and not stop.requested()
                os.kill(os.getpid(), sig)
                assert stop.requested() and stop.signum == sig and stop.signal_name == sig.name
                assert stop.requested()  # stays requested
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)  # the previous handler is back
        assert seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert runtime.EXIT_STOPPED == 75


STOPPED_EXIT = """
import os, signal, sys
from uda import runtime
try:
    with runtime.StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested()
        raise runtime.Stopped("SIGTERM")  # what the loop raises once the checkpoint is written
except runtime.Stopped:
    pass
for sig in (signal.SIGTERM, signal.SIGUSR1):  # torchrun's agent / a scheduler repeating itself while we exit
    os.kill(os.getpid(), sig)
print("still here", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, flush=True)
sys.exit(runtime.EXIT_STOPPED)
"""


def test_a_stopped_run_ignores_further_stop_signals_while_it_exits(tmp_path):
    """After the block ends with Stopped, a second SIGTERM (torchrun's agent sends one to every rank still alive
    once the first has exited) or SIGUSR1 must not kill the process: it exits with 75, not -15."""
    script = tmp_path / "stopped.py"
    script.write_text(STOPPED_EXIT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False,
                            env=EXAMPLES_ENV)
    assert result.returncode == 75, (result.returncode, result.stderr)
    assert result.stdout.strip() == "still here True", result.stdout


DIST_STOP = """
import os, signal, sys
import torch.distributed as tdist
from uda import runtime
rank = int(sys.argv[1])
tdist.init_process_group("gloo", init_method="file://{store}", rank=rank, world_size=2)
answers = []
with runtime.StopRequest(every=3) as stop:
    for call in range(1, 13):
        if rank == 1 and call == 4:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled, after its 4th step
        answers.append(stop.requested())
        if answers[-1]:
            break
print(len(answers), answers.count(True))
tdist.destroy_process_group()
"""


def test_stop_request_is_agreed_across_ranks(tmp_path):
    script = tmp_path / "stop.py"
    script.write_text(DIST_STOP.format(store=str(tmp_path / "store")))
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=EXAMPLES_ENV) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    # both ranks stop after the same call: the first multiple of every=3 after the signal (call 6)
    assert [o.strip() for o, _ in outs] == ["6 1", "6 1"], outs


# ---------------------------------------------------------------------------------------------- non-finite guard
class SyncRecorder(TorchDispatchMode):
    OPS = frozenset({"aten._local_scalar_dense", "aten.item", "aten.is_nonzero", "aten.nonzero", "aten.masked_select"})

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func.overloadpacket) in self.OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_non_finite_guard_names_the_first_term_and_iteration():
    guard = runtime.NonFiniteGuard()
    net = torch.nn.Linear(3, 1)
    recorder = SyncRecorder()
    for it in range(1, 11):
        x = torch.ones(2, 3) * (float("nan") if it == 9 else 1.0)
        loss = net(x).pow(2).mean()
        net.zero_grad()
        loss.backward()
        fcl = torch.tensor(float("inf") if it >= 7 else 0.5)
        with recorder:  # the per-step part: no host read
            guard.update(it, {"ce_src": loss.detach(), "fcl": fcl}, net.parameters())
        if it == 5:
            guard.check(it)  # all finite so far
    assert recorder.syncs == []
    with recorder:  # the control: a host read is seen
        torch.ones(1).item()
    assert recorder.syncs == ["aten._local_scalar_dense.default"]
    with pytest.raises(runtime.NonFiniteError) as info:
        guard.check(10)
    message = str(info.value)
    assert message.startswith("non-finite fcl (NaN or inf) at iteration 7 (checked iterations 6-10)")
    assert "ce_src (iteration 9)" in message and "grad_norm (iteration 9)" in message


def test_non_finite_guard_sees_gradients_alone():
    guard = runtime.NonFiniteGuard()
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([0.0, float("nan"), 0.0])
    guard.update(3, {"loss": torch.tensor(1.0)}, [w])
    with pytest.raises(runtime.NonFiniteError, match="non-finite grad_norm .* at iteration 3"):
        guard.check()
    off = runtime.NonFiniteGuard(grads=False)  # fp16 + GradScaler: inf gradients are the scaler's business
    off.update(3, {"loss": torch.tensor(1.0)}, [w])
    off.check()


def test_non_finite_tensors():
    state = {"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")]), "n": torch.tensor(3), "c": torch.zeros(0)}
    assert runtime.non_finite_tensors(state.items()) == ["b"]


# ---------------------------------------------------------------------------------------------- output folder, resume
def test_output_dir_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / "somefile"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"expected --out to be a folder that can be created") as info:
        runtime.check_output_dir(blocker / "sub")
    assert str(blocker / "sub") in str(info.value)
    with pytest.raises(ValueError, match="not a folder"):
        runtime.check_output_dir(blocker)


def test_output_dir_without_room_is_refused(tmp_path):
    out = runtime.check_output_dir(tmp_path / "a" / "b", need_bytes=1)
    assert out.is_dir() and list(out.iterdir()) == []  # the probe is gone
    with pytest.raises(ValueError, match=r"to have about \d+ MiB free.*got \d+ MiB") as info:
        runtime.check_output_dir(out, need_bytes=2**62)
    assert str(out) in str(info.value)


def test_output_estimate():
    net = torch.nn.Linear(100, 10)
    assert runtime.tensor_bytes(net.state_dict()) == 4 * 1010
    assert runtime.tensor_bytes({"a": [torch.zeros(2, dtype=torch.float64)], "b": (torch.zeros(3, dtype=torch.uint8),)}) == 19
    # checkpoint + its temporary copy + source_only + adapted + 3 folders of 10 x 50-pixel labels (2 rounds and
    # the one being written); with decisions round_start + 2 best-scored, with the control 2 more
    plain = runtime.output_files(100, 1000, rounds=2, pseudo_labels=10, pseudo_label_pixels=50, margin=0)
    assert sum(plain.values()) == 1000 + 1000 + 100 + 100 + 3 * 10 * 50
    every = runtime.output_files(100, 1000, rounds=2, decisions=True, control=True, stage1_best=True,
                                 pseudo_labels=10, pseudo_label_pixels=50, margin=0)
    assert sum(every.values()) == sum(plain.values()) + 100 + 1000 + 2 * 100 + 2 * 100


def test_resume_auto(tmp_path):
    assert runtime.resolve_resume(None, tmp_path) is None
    assert runtime.resolve_resume("auto", tmp_path) is None  # fresh start
    (tmp_path / "checkpoint.pt.tmp").write_bytes(b"half")
    assert runtime.resolve_resume("auto", tmp_path) is None  # a half-written file is never read back
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    assert runtime.resolve_resume("auto", tmp_path) == tmp_path / "checkpoint.pt"
    assert runtime.resolve_resume("other.pt", tmp_path) == Path("other.pt")
