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


def faces_arg(text: str) -> str:
    """argparse type of ``--faces``: auto, none, arcface or head (else exit 2, naming them)."""
    if text in ("auto", "none", "arcface", "head"):
        return text
    raise argparse.ArgumentTypeError(f"--faces must be one of arcface, head, none, got {text!r}")


def add_faces(p) -> None:
    """``--faces [arcface|head|none]`` of the commands that embed images (issue #26)."""
    p.add_argument(
        "--faces",
        type=faces_arg,
        nargs="?",
        const="arcface",
        default="auto",
        metavar="arcface|head|none",
        help="detect the largest face of each image (MTCNN) and embed its crop aligned on "
        "the template (arcface: the 112x112 ArcFace one; head: a looser crop with hair and "
        "chin); none: the whole image. Default: the run's own (train --faces); --faces alone "
        "= arcface. A folder is aligned once (cached in RUN_DIR/faces_cache), images without "
        "a face are left out and counted",
    )


def faces_line(inf) -> str | None:
    """One line on the faces found in the last folder aligned, or None."""
    s = getattr(inf, "faces_summary", None)
    if not s:
        return None
    errs = f", {s['errors']} unreadable" if s.get("errors") else ""
    return (
        f"faces ({inf.faces}): {s['with_face']} of {s['images']} images with a face, "
        f"{s['no_face']} without a face left out{errs}"
    )
