"""Packaging that keeps building: an SPDX license expression (setuptools >= 77), no license classifier, and a
wheel built from a copy of the project without a deprecation warning."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_declares_an_spdx_license():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11, what the tests run on
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = config["project"]
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    assert "setuptools>=77" in config["build-system"]["requires"]  # the first with PEP 639 license expressions
    assert (ROOT / "LICENSE").is_file()


def test_wheel_builds_without_deprecation_warnings(tmp_path):
    pytest.importorskip("build")  # in the test extra
    copy = tmp_path / "project"
    copy.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, copy / name)
    shutil.copytree(ROOT / "src", copy / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                             str(tmp_path / "dist"), str(copy)], capture_output=True, text=True, timeout=300,
                            check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "deprecated" not in output.lower() and "SetuptoolsDeprecationWarning" not in output, output
    (wheel,) = (tmp_path / "dist").glob("protocl-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata).decode()
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in archive.namelist())
    assert "License-Expression: BSD-3-Clause" in text and "License-File: LICENSE" in text
    assert "Classifier: License ::" not in text


def test_declared_lower_bounds_are_the_checked_ones():
    """``.ci/lower-bounds`` runs the library's tests on exactly the lowest versions pyproject.toml declares."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    script = (ROOT / ".ci" / "lower-bounds").read_text()
    python = project["requires-python"].removeprefix(">=")
    (torch_bound,) = [d.removeprefix("torch>=") for d in project["dependencies"] if d.startswith("torch")]
    assert f'PYTHON="${{PYTHON:-python{python}}}"' in script
    assert f'TORCH="${{TORCH:-{torch_bound}.0}}"' in script
