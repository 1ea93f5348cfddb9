"""``tripletlab bench``: a thin entry point to ``benchmarks/bench_mining.py``.

The mining benchmark (600 lines, with a dense TF-Addons reference implementation and the
pytorch-metric-learning comparisons) lives beside the other benchmarks, outside the installed
package. This module finds it, in order: ``$TRIPLETLAB_BENCHMARKS/bench_mining.py``, the
``benchmarks/`` folder of the source checkout this package runs from (an editable install, as
in development and CI), and ``./benchmarks/`` of the current directory. Without any of them the
command says where to get it and exits 1.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from ._base import register_command

_SCRIPT = "bench_mining.py"


def _candidates() -> list[Path]:
    found = []
    if os.environ.get("TRIPLETLAB_BENCHMARKS"):
        found.append(Path(os.environ["TRIPLETLAB_BENCHMARKS"]) / _SCRIPT)
    found.append(Path(__file__).resolve().parents[3] / "benchmarks" / _SCRIPT)  # src layout
    found.append(Path.cwd() / "benchmarks" / _SCRIPT)
    return found


def load_benchmark() -> ModuleType | None:
    """The benchmark module, imported from the first candidate file that exists (or None)."""
    if "bench_mining" in sys.modules:
        return sys.modules["bench_mining"]
    for path in _candidates():
        if path.is_file():
            spec = importlib.util.spec_from_file_location("bench_mining", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules["bench_mining"] = module
            spec.loader.exec_module(module)
            return module
    return None


def run_benchmark(argv: list[str]) -> int:
    """Run the mining benchmark with its own options; returns its exit code."""
    module = load_benchmark()
    if module is None:
        print(
            "error: `tripletlab bench` needs a source checkout of tripletlab: its benchmarks/ "
            "folder is not part of the installed package. Clone the repository, then "
            "`pip install -e '.[bench]'` and run `tripletlab bench` (or "
            f"`python benchmarks/{_SCRIPT}`) there, or set TRIPLETLAB_BENCHMARKS to the "
            f"folder holding {_SCRIPT}",
            file=sys.stderr,
        )
        return 1
    try:
        return int(module.run_benchmark(argv) or 0)
    except SystemExit as e:  # its argparse: --help (0) or a usage error (2)
        return int(e.code or 0)


@register_command("bench")
def _add_bench(sub) -> None:
    # listed in `tripletlab --help`; `main` hands `bench ...` to the benchmark's own parser
    sub.add_parser(
        "bench",
        help="benchmark mining speed/memory against pml (`tripletlab bench -h`: its options)",
        add_help=False,
    )
