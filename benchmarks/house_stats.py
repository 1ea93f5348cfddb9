"""Size of the house: modules at the package root, packages, largest modules and functions.

python benchmarks/house_stats.py [CHECKOUT]    (default: this checkout)
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1]
    src = root / "src" / "tripletlab"
    files = list(src.rglob("*.py"))
    mods = sorted((len(p.read_text().splitlines()), str(p.relative_to(src))) for p in files)
    funcs = []
    for p in files:
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((n.end_lineno - n.lineno + 1, f"{p.relative_to(src)}:{n.name}"))
    funcs.sort(reverse=True)
    print("root modules", sorted(p.name for p in src.glob("*.py")))
    print("packages", sorted(p.name for p in src.iterdir() if (p / "__init__.py").exists()))
    print("modules", len(mods), "lines", sum(m[0] for m in mods))
    print("largest modules", mods[::-1][:5])
    print("largest functions", funcs[:8])


if __name__ == "__main__":
    main()
