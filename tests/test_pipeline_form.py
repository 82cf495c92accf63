"""The reference pipeline's form (issue 25): files a reader takes in, a package map that matches the tree, no
import cycle, one ``sys.path`` edit, one ``predict`` command. These read the source; they do not run it."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "uda"
MAX_LINES = {"examples/train_gta2cs.py": 350, "examples/train_daformer.py": 350}  # the loop file; every other pipeline file: DEFAULT_MAX
DEFAULT_MAX = 450


def pipeline_files() -> list[Path]:
    return sorted((ROOT / "examples").rglob("*.py"))


def module_name(path: Path, base: Path = ROOT / "examples") -> str:
    parts = path.relative_to(base).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, base: Path = ROOT / "examples") -> set[str]:
    """Every module that ``path`` imports (absolute names), at the top or inside a function."""
    name = module_name(path, base)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.update([target] + [f"{target}.{alias.name}" for alias in node.names])
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def import_cycles(package: Path) -> list[list[str]]:
    """The import cycles among the modules of ``package`` (a package's ``__init__`` importing its own
    submodules is how a package is built, not a cycle)."""
    base = package.parent
    modules = {module_name(p, base): p for p in package.rglob("*.py")}
    graph = {m: {t for t in imports(p, base) if t in modules and t != m and not t.startswith(m + ".")}
             for m, p in modules.items()}
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt, stack + [nxt])
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return cycles


def test_every_pipeline_file_is_read_in_one_sitting():
    too_long = {}
    for path in pipeline_files():
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES.get(rel, DEFAULT_MAX):
            too_long[rel] = lines
    assert too_long == {}


def test_no_import_cycle_in_the_pipeline_package():
    assert import_cycles(PACKAGE) == []


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "uda"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub.b import g\n")
    (pkg / "sub" / "b.py").write_text("from .. import a\n")
    assert import_cycles(pkg) == [["uda.a", "uda.sub.b", "uda.a"]]


def test_the_package_map_lists_every_module_once():
    """``uda/__init__.py`` names every module of the package, one line each; docs/examples.md's files table
    names every file of examples/."""
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    listed = re.findall(r"^- :mod:`([\w.]+)`", doc, re.M)
    on_disk = sorted(module_name(p).removeprefix("uda.") for p in PACKAGE.rglob("*.py")
                     if p.name != "__init__.py" and p.parent == PACKAGE)
    on_disk += ["datasets"]
    assert sorted(listed) == sorted(on_disk)
    table = (ROOT / "docs" / "examples.md").read_text().split("## Files", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"`(examples/[\w/.]+\.py|examples/uda/datasets/)`", table))
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.py")}
    files |= {p.relative_to(ROOT).as_posix() for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    files |= {"examples/uda/datasets/"}
    assert files - in_table == set() and in_table - files == set()


def test_one_sys_path_edit_and_one_predict_command():
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    edits = [f for f in tracked if re.search(r"sys\.path(\[.*\])?\s*(\.insert|\.append|=|\[:0\])",
                                             (ROOT / f).read_text())]
    assert edits == ["benchmarks/__init__.py"]
    assert sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").rglob("predict*.py")) == [
        "examples/predict.py"]
