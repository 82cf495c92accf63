"""Shared helpers of the tests of the reference pipeline (examples/train_gta2cs.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import train_gta2cs  # noqa: E402
from gta2cs import synthetic, trainer  # noqa: E402

# a few iterations of every stage on tiny crops
TINY_RUN = ["--source-iters", "6", "--rounds", "2", "--round-iters", "4", "--batch-size", "2", "--crop", "32",
            "--resize", "32", "--eval-size", "64x32", "--log-every", "2", "--ckpt-every", "2", "--workers", "0",
            "--threads", "1"]


def write_fixture(root: Path, source: str = "gta5", seed: int = 3) -> tuple[Path, Path]:
    """A tiny dataset in the real layouts (the demo generator at a small size): ``(source_root, cityscapes_root)``."""
    return synthetic.write_demo_dataset(root, seed=seed, source_images=6, target_train=6, target_val=3,
                                        source_size=(72, 40), target_size=(64, 32), source=source)


def data_args(source_root: Path, cityscapes_root: Path, out: Path, source: str = "gta5") -> list[str]:
    return [f"--{source}-root", str(source_root), "--cityscapes-root", str(cityscapes_root), "--arch", "tiny",
            "--out", str(out)]


def make_trainer(argv: list[str]) -> trainer.Trainer:
    """A :class:`Trainer` built as ``train_gta2cs.main`` builds it (threads, defaults, demo data)."""
    args = train_gta2cs.resolve(train_gta2cs.build_parser().parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    return trainer.Trainer(args)


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


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
