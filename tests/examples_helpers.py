"""Shared helpers of the tests of the reference pipeline (examples/train_gta2cs.py).

``examples/`` (the script and its ``uda`` package), ``benchmarks/`` and the repository root are on the
import path through pytest's ``pythonpath`` option (pyproject.toml).
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
import train_gta2cs
from uda import options
from uda import decisions
from uda.demo import write_demo_dataset

import protocl

# a few iterations of every stage on tiny crops
TINY_RUN = ["--source-iters", "6", "--rounds", "2", "--round-iters", "4", "--batch-size", "2", "--crop", "32",
            "--resize", "32", "--eval-size", "64x32", "--log-every", "2", "--ckpt-every", "2", "--workers", "0",
            "--threads", "1"]


class Crash(Exception):
    """Raised by :func:`crash_after`: the process "dies" after a step, before anything else is saved."""


def crash_after(steps: int):
    """A ``step_context`` that raises :class:`Crash` when the ``steps``-th training step has ended."""
    done = [0]

    @contextlib.contextmanager
    def context(kind: str, checked: bool):
        yield
        done[0] += 1
        if done[0] == steps:
            raise Crash(f"after {steps} steps")

    return context


def write_fixture(root: Path, source: str = "gta5", seed: int = 3) -> tuple[Path, Path]:
    """A tiny dataset in the real layouts (the demo generator at a small size): ``(source_root, cityscapes_root)``."""
    return write_demo_dataset(root, seed=seed, source_images=6, target_train=6, target_val=3,
                              source_size=(72, 40), target_size=(64, 32), source=source)


def data_args(source_root: Path, cityscapes_root: Path, out: Path, source: str = "gta5") -> list[str]:
    return [f"--{source}-root", str(source_root), "--cityscapes-root", str(cityscapes_root), "--arch", "tiny",
            "--out", str(out)]


def build(argv: list[str]) -> train_gta2cs.Run:
    """A run built as ``train_gta2cs.main`` builds it."""
    return train_gta2cs.setup(options.parse_args(argv))


def train_with(argv: list[str], step_context=None, *, script=train_gta2cs, parse_args=options.parse_args) -> int:
    """``script.main`` (default ``train_gta2cs``; ``train_daformer`` with its ``parse_args``) with a
    ``step_context`` (e.g. :func:`crash_after`): 0 when the run finished, 1 when it crashed (nothing saved after the
    last periodic checkpoint)."""
    run = script.setup(parse_args(argv))
    state = script.start(run)
    checks_before = protocl.value_checks_enabled()
    try:
        script.train(run, state, step_context=step_context)
        script.finish(run, state)
    except Crash:
        return 1
    finally:
        protocl.set_value_checks(checks_before)
    return 0


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)  # RNG states are plain since issue 17


def assert_same_state(a, b, where: str = "") -> None:
    """Recursive equality of checkpoint contents: tensors bitwise, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} != {sorted(b)}"
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:  # NaN
        assert isinstance(b, float) and b != b, f"{where}: NaN != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def expected_last_line(metrics: dict, key: str = "miou") -> str:
    """The run's last line from its metrics.json: ``target mIoU: source-only X -> adapted Y`` and, with round
    decisions, which model was delivered and what it contains (:func:`uda.decisions.summary`) and the last
    model's mIoU."""
    line = f"target mIoU: source-only {metrics['source_only'][key]:.2f} -> adapted {metrics['adapted'][key]:.2f}"
    if "round_decisions" in metrics:
        c = metrics["config"]
        last = metrics.get("adapted_last", metrics["adapted"])[key]
        line += (f" ({decisions.summary(metrics['round_decisions'], c['rounds'], c['source_iters'], c['round_iters'])}"
                 f"; the last model {last:.2f})")
    return line


def scripted_scores(values: dict, default: float | None = None):
    """A stand-in for ``uda.decisions.score_model``: the score by who asks and for which round
    (``values[(caller, round)]``, caller ``begin_round`` / ``decide`` / ``end_fallback`` / ``begin_control`` /
    ``control_point``; ``default`` for the pairs not given), so the decisions a test expects happen whatever the
    tiny model learns."""

    def score_model(run, state) -> float:
        caller = inspect.stack()[1].function  # end_fallback and control_point run once the counter has moved on
        key = (caller, state["round"] - (caller in ("end_fallback", "control_point")))
        return values[key] if default is None or key in values else default

    return score_model
