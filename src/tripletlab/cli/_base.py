"""The subcommand registry and output helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..utils import jsonable

COMMANDS: list[tuple[str, Callable[[argparse._SubParsersAction], None]]] = []


def register_command(name: str):
    """Decorator adding ``add_parser(subparsers)`` for a subcommand, in definition order."""

    def deco(fn):
        COMMANDS.append((name, fn))
        return fn

    return deco


def print_json(obj: Any) -> None:
    """Print ``obj`` as indented JSON (numpy values converted, NaN/Inf as null)."""
    print(json.dumps(jsonable(obj), indent=2))
