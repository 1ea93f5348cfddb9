"""Mining/loss speed and memory against pytorch-metric-learning, a dense TF-Addons semi-hard
reference and the GEMM floor (the code lives in :mod:`tripletlab.bench`; results in
docs/benchmarks.md).

    python benchmarks/bench_mining.py                  # full table (B = 256 ... 8192)
    python benchmarks/bench_mining.py --quick          # B in {64, 256}, 2 repeats
    python benchmarks/bench_mining.py --threads 1 --json results.json
    tripletlab bench --quick                           # the same, through the CLI

Needs the ``bench`` extra (``pip install -e .[bench]``) for the pytorch-metric-learning columns;
without it those are marked as skipped.
"""

import sys

from tripletlab.bench import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark(sys.argv[1:]))
