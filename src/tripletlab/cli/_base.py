"""The subcommand registry and output helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from ..errors import InputError
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


def postprocess_arg(text: str) -> str:
    """argparse type of ``--postprocess``: ``auto`` or a valid spec (else exit 2, naming it)."""
    from ..metrics.postprocess import parse_postprocess

    if text == "auto":
        return text
    try:
        return str(parse_postprocess(text))
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_postprocess(p, what: str) -> None:
    p.add_argument(
        "--postprocess",
        type=postprocess_arg,
        default="auto",
        metavar="SPEC",
        help=f"retrieval post-processing {what}: auto (the run's choice on its validation "
        "classes, in eval.json; default) | none | aqe | dba | dba+aqe | rerank, with "
        "parameters as NAME:k=..,alpha=.. (rerank: k1=..,k2=..,lambda=..)",
    )
