"""The ``tripletlab`` command: train, eval, embed, index, search, verify, report, bench, serve,
export.

A thin layer over the library: every command parses its options, calls the library (training:
:class:`tripletlab.train.Trainer`; everything on a trained run: :class:`tripletlab.inference.
Inference`) and prints. One module per command group: ``train`` (flags generated from
:class:`~tripletlab.train.TrainConfig`), ``run`` (eval, embed, index, search, verify, report),
``serve`` (serve, export) and ``bench``. Exit codes: 0 success, 1 runtime error (message on
stderr, traceback only with ``--debug``), 2 usage error.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..errors import TripletLabError, UsageError
from . import bench, faces, run, serve, train, tune  # noqa: F401 - importing registers the commands
from ._base import COMMANDS, register_command

__all__ = ["build_parser", "main", "register_command"]


def build_parser() -> argparse.ArgumentParser:
    """The ``tripletlab`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="tripletlab",
        description="Learn embeddings with the triplet loss: train, evaluate, embed, index, "
        "search and verify.",
    )
    parser.add_argument("--version", action="version", version=f"tripletlab {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 runtime error, 2 usage error).

    ``--debug`` may stand anywhere on the line (before or after the subcommand).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] == ["bench"]:  # the benchmark parses its own options (`tripletlab bench -h`)
        return bench.run_benchmark(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return int(args.func(args) or 0)
    except KeyboardInterrupt as e:  # TrainingInterrupted says where and how to continue
        print(str(e) or "interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        if debug:
            raise
        print(f"usage error: {e} (see: tripletlab {args.command} --help)", file=sys.stderr)
        return 2
    except (TripletLabError, OSError, ValueError, RuntimeError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - no traceback for the user, even for the unexpected
        if debug:
            raise
        print(
            f"error: {type(e).__name__}: {e}\n(unexpected; rerun with --debug for the "
            "traceback and report it if the message does not explain the problem)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
