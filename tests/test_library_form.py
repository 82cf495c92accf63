r"""The library's form (issue 28): kernels never import the validation layer, shared defaults are written once,
and the code map of docs/conventions.md names functions that exist."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import protocl
from protocl import _types

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "protocl"
SHARED_DEFAULTS = {"temperature": "TEMPERATURE", "threshold": "THRESHOLD", "momentum": "MOMENTUM",
                   "min_purity": "MIN_PURITY", "eps": "EPS", "ignore_index": "IGNORE_INDEX"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_kernels_never_import_the_validation_layer():
    for path in sorted((SRC / "_kernels").glob("*.py")):
        bad = {name for name in _imports(path) if "_validation" in name}
        assert not bad, f"{path.name} imports {bad}: kernels take types and constants from protocl._types"


def _defaults(tree: ast.AST):
    """(function name, parameter, default node) of every parameter with a default in a module."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            for arg, default in zip(positional[len(positional) - len(args.defaults):], args.defaults):
                yield node.name, arg.arg, default
            for arg, default in zip(args.kwonlyargs, args.kw_defaults):
                if default is not None:
                    yield node.name, arg.arg, default


def test_shared_defaults_are_written_once():
    # a shared default is the constant of protocl._types, never a literal repeated in each signature
    literal = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "_types.py":
            continue
        for fn, param, default in _defaults(ast.parse(path.read_text())):
            if param in SHARED_DEFAULTS and isinstance(default, ast.Constant):
                literal.append(f"{path.relative_to(SRC)}:{fn}({param}={default.value!r})")
    assert not literal, f"write these defaults as the constants of protocl._types: {literal}"


def test_every_public_signature_shares_the_default():
    seen = 0
    for name in protocl.__all__:
        obj = getattr(protocl, name)
        callables = [obj] if inspect.isfunction(obj) else [
            m for m in vars(obj).values() if inspect.isfunction(m)] if inspect.isclass(obj) else []
        for fn in callables:
            for param in inspect.signature(fn).parameters.values():
                if param.name in SHARED_DEFAULTS and param.default is not inspect.Parameter.empty:
                    assert param.default == getattr(_types, SHARED_DEFAULTS[param.name]), (name, fn, param)
                    seen += 1
    assert seen >= 20


CODE_REF = re.compile(r"`(_kernels/\w+|contrastive|prototypes|_validation|losses)\.(\w+)`")


def test_the_code_map_names_functions_that_exist():
    text = (ROOT / "docs" / "conventions.md").read_text(encoding="utf-8")
    section = text[text.index("## Where the code lives"):]
    refs = CODE_REF.findall(section)
    assert len(refs) >= 15
    for module, attribute in refs:
        module_name = "protocl." + module.replace("/", ".")
        assert hasattr(importlib.import_module(module_name), attribute), f"docs name {module}.{attribute}"
    for module in re.findall(r"`(protocl\._\w+)`", section):
        importlib.import_module(module)
