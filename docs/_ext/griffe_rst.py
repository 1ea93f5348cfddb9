"""Griffe extension for the documentation site: read the package's docstrings as written.

The docstrings are Google style with two reST habits that Markdown does not know:

- ``Example:`` headings (Google style proper says ``Examples:``): renamed so the doctest lines
  under them render as code, not as Markdown text (where ``[0.2667, 0.4]`` is a link);
- Sphinx roles (``:func:`name```, ``:class:``, ``:mod:``, ``:data:``...): shown as inline code;
- a reST ``Example::`` before an indented block: one colon (the block renders as code anyway).

Only the copy that the site renders changes; the source files (and their doctests) do not.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const|ref):`~?([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)  # reST "Example::" before a code block


class ReadRstHabits(griffe.Extension):
    """Rewrite ``Example:`` to ``Examples:`` and Sphinx roles to inline code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is None:
            return
        text = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
        text = _ROLE.sub(r"`\1`", text)
        text = _LITERAL.sub(r"\1:", text)
        obj.docstring.value = text.replace("``\\ s", "``s")
