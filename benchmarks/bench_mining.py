"""Mining/loss speed and memory against pytorch-metric-learning and the GEMM floor.

python benchmarks/bench_mining.py            # full table (B = 256 ... 8192)
python benchmarks/bench_mining.py --quick    # small subset
tripletlab bench --quick                     # the same, through the CLI
"""

import sys

from tripletlab.bench import run_benchmark

if __name__ == "__main__":
    sys.exit(run_benchmark(sys.argv[1:]))
