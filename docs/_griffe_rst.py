"""Griffe extension for the API reference: the reST bits of protocl's docstrings, rendered as Markdown.

protocl's docstrings are Google style with a few reStructuredText constructs (``.. math::`` blocks,
``:math:``, ``:func:``, ``:class:``, ``:meth:`` roles), which read well in ``help()`` and in the source.
mkdocstrings renders docstrings as Markdown, where those constructs come out raw (and the underscores of the
LaTeX become emphasis). This extension rewrites them before rendering:

- ``.. math::`` + indented block  ->  ``$$ ... $$`` (rendered by ``pymdownx.arithmatex`` + MathJax);
- ``:math:`x```                   ->  ``$x$``;
- ``:func:`~protocl.name``` etc.  ->  a link to ``protocl.name`` when it is a public name, else inline code.

Loaded by ``mkdocs.yml`` (``extensions`` of the mkdocstrings Python handler); not part of the site.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import protocl

_PUBLIC = set(protocl.__all__)
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<rest>.*)$")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_XREF_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc):`(?P<target>[^`]+)`")


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def convert_math_blocks(text: str) -> str:
    """``.. math::`` directives (with their indented block) to ``$$`` display math."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["rest"]] if match["rest"].strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _indent_of(lines[i]) > len(indent)):
            body.append(lines[i])
            i += 1
        while body and not body[-1].strip():
            body.pop()
        width = min((_indent_of(line) for line in body if line.strip()), default=0)
        out += [indent + "$$", *(indent + line[width:] for line in body), indent + "$$", ""]
    return "\n".join(out)


def _xref(match: re.Match) -> str:
    target = match["target"].strip()
    short = target.startswith("~")
    target = target.lstrip("~").rstrip("()")
    name = target.split(".")[-1]
    if name in _PUBLIC and (target in (name, f"protocl.{name}") or target.startswith("protocl.")):
        return f"[`{name}`][protocl.{name}]"
    return f"`{name if short else target}`"


def convert(text: str) -> str:
    """All the rewrites of the module docstring, idempotent."""
    text = convert_math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m[1]}$", text)
    return _XREF_ROLE.sub(_xref, text)


class RstToMarkdown(griffe.Extension):
    """Rewrite docstrings once the object tree is built (``on_object``; ``on_instance`` on older griffe)."""

    def _rewrite(self, obj: Any) -> None:
        docstring = getattr(obj, "docstring", None)
        if docstring is not None and docstring.value:
            docstring.value = convert(docstring.value)

    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        self._rewrite(obj)

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        self._rewrite(obj)
