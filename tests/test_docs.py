"""The documentation stays true to the code.

Its examples run, the API reference lists every public name, every public docstring has a Shape section and an
example, and links between pages resolve.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

import protocl

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Pages whose ```python blocks are complete, runnable examples (other pages may show fragments).
RUNNABLE_PAGES = ("index.md", "method.md", "conventions.md", "troubleshooting.md", "reproduce.md")
FENCED_PYTHON = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
API_DIRECTIVE = re.compile(r"^::: protocl\.(\w+)\s*$", re.MULTILINE)
MD_LINK = re.compile(r"\]\((?!https?://|mailto:)([^)#\s]+)(?:#[^)\s]*)?\)")
# Public names that are not operators on tensors: result containers, the value-check switch, a constant.
NO_SHAPE_SECTION = {
    "PooledPrototypes",
    "StepOutput",
    "set_value_checks",
    "value_checks_enabled",
    "flush_value_checks",
    "IGNORE_INDEX",
}


def _python_blocks():
    for page in RUNNABLE_PAGES:
        path = DOCS / page
        for index, match in enumerate(FENCED_PYTHON.finditer(path.read_text(encoding="utf-8"))):
            yield pytest.param(path, match.group(1), id=f"{page}-{index}")


@pytest.mark.parametrize(("page", "code"), list(_python_blocks()))
def test_python_examples_in_docs_run(page: Path, code: str):
    was_on = protocl.value_checks_enabled()
    try:
        exec(compile(code, f"{page.name} example", "exec"), {"__name__": "__docs_example__"})
    finally:
        protocl.set_value_checks(was_on)


def test_api_reference_lists_every_public_name():
    text = (DOCS / "api.md").read_text(encoding="utf-8")
    documented = API_DIRECTIVE.findall(text)
    assert len(documented) == len(set(documented)), "a name is documented twice"
    unknown = set(documented) - set(protocl.__all__)
    assert not unknown, f"docs/api.md documents names that protocl does not export: {sorted(unknown)}"
    missing = set(protocl.__all__) - set(documented) - {"IGNORE_INDEX"}
    assert not missing, f"docs/api.md lacks a '::: protocl.NAME' entry for: {sorted(missing)}"
    assert "IGNORE_INDEX" in text


@pytest.mark.parametrize("name", sorted(set(protocl.__all__) - {"IGNORE_INDEX"}))
def test_public_docstring_has_example(name: str):
    doc = inspect.getdoc(getattr(protocl, name)) or ""
    assert doc.strip(), f"protocl.{name} has no docstring"
    if name in NO_SHAPE_SECTION:
        return
    assert "Shape:" in doc, f"protocl.{name}: the docstring has no 'Shape:' section"
    assert ">>>" in doc, f"protocl.{name}: the docstring has no doctest example"


def test_module_paths_named_in_method_page_exist():
    text = (DOCS / "method.md").read_text(encoding="utf-8")
    paths = set(re.findall(r"`(protocl\.\w+(?:\.\w+)*)`", text))
    assert paths, "docs/method.md names no module path"
    for path in sorted(paths):
        module_name, _, attribute = path.rpartition(".")
        try:
            module = importlib.import_module(path)
        except ImportError:
            module = importlib.import_module(module_name)
            assert hasattr(module, attribute), f"docs/method.md names {path}, which does not exist"
        else:
            assert module is not None


def test_index_lists_every_recipe():
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    for recipe in sorted((DOCS / "recipes").glob("*.py")):
        assert f"recipes/{recipe.name}" in index, f"docs/index.md does not link {recipe.name}"


def test_nav_pages_exist():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = re.findall(r"^\s*-\s*[^:\n]+:\s*(\S+\.md)\s*$", config, re.MULTILINE)
    assert "index.md" in pages and "method.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml nav names pages that do not exist: {missing}"


def test_relative_links_resolve():
    broken = []
    for page in sorted(DOCS.glob("*.md")):
        for target in MD_LINK.findall(page.read_text(encoding="utf-8")):
            if not (page.parent / target).exists():
                broken.append(f"{page.name} -> {target}")
    assert not broken, f"broken links: {broken}"


def test_mkdocs_strict_build(tmp_path: Path):
    """The site builds without a warning (needs the ``docs`` extra: ``pip install -e ".[docs]"``)."""
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
