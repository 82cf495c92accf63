"""Every integration recipe in ``docs/recipes`` runs as a new user would run it and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "docs" / "recipes"
RECIPES = sorted(RECIPE_DIR.glob("*.py"))
EXPECTED = {"plain_pytorch_loop.py", "daformer_style_uda.py", "functional_ops.py", "lightning_module.py"}


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    # protocl importable even when the package is not installed (a plain checkout with PYTHONPATH unset).
    # examples/: daformer_style_uda.py builds DAFormer's network from the repository's example package (its docstring
    # says to run it with PYTHONPATH=examples).
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), str(ROOT / "examples"), env.get("PYTHONPATH", "")) if p
    )
    # The recipes use tiny tensors: one thread is faster than many on a loaded CI machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_every_documented_recipe_exists():
    assert EXPECTED <= {recipe.name for recipe in RECIPES}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=_environment(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_runs(recipe: Path, tmp_path: Path):
    # Run from an empty directory: a recipe must not depend on the working directory or leave files behind.
    result = _run([sys.executable, str(recipe)], tmp_path)
    report = (
        f"{recipe.name} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert result.returncode == 0, report
    assert result.stdout.strip(), f"{recipe.name} printed nothing\n{report}"
    assert "Traceback" not in result.stderr, report
    assert list(tmp_path.iterdir()) == [], f"{recipe.name} wrote files: {list(tmp_path.iterdir())}"
    if recipe.name == "lightning_module.py":  # `lightning` is in the test extra: the real Trainer ran it
        assert "training with Lightning 2." in result.stdout, report


def test_lightning_recipe_without_lightning(tmp_path: Path):
    """The recipe's fallback: the same hooks in Lightning's order from a plain loop when Lightning is absent."""
    recipe = RECIPE_DIR / "lightning_module.py"
    hide = ("import sys, runpy; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None; "
            f"runpy.run_path({str(recipe)!r}, run_name='__main__')")
    result = _run([sys.executable, "-c", hide], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lightning is not installed: training with the plain loop" in result.stdout
    assert "epoch 2: static coverage" in result.stdout and "checkpointed state" in result.stdout
