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
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    # The recipes use tiny tensors: one thread is faster than many on a loaded CI machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_every_documented_recipe_exists():
    assert EXPECTED <= {recipe.name for recipe in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_runs(recipe: Path, tmp_path: Path):
    # Run from an empty directory: a recipe must not depend on the working directory or leave files behind.
    result = subprocess.run(
        [sys.executable, str(recipe)],
        cwd=tmp_path,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = (
        f"{recipe.name} exited {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    )
    assert result.returncode == 0, report
    assert result.stdout.strip(), f"{recipe.name} printed nothing\n{report}"
    assert "Traceback" not in result.stderr, report
    assert list(tmp_path.iterdir()) == [], f"{recipe.name} wrote files: {list(tmp_path.iterdir())}"
