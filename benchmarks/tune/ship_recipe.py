"""Copy a ``tripletlab tune`` result into a shipped recipe (``src/tripletlab/recipes/NAME.json``)
and keep the search's record (trials table, best recipe) in ``benchmarks/tune/``.

Usage (from the repository root):
    python benchmarks/tune/ship_recipe.py /tmp/tune/att att_faces "AT&T faces: ..."

The recipe keeps the ``_tune`` block that ``tune`` wrote (command, budget, trials, wall time,
best validation score and its fold scores, date); ``_comment`` is replaced by the text given.
Nothing here evaluates anything: the test split is evaluated once, afterwards, with
``tripletlab train --config NAME``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    tune_dir, name, comment = Path(argv[0]), argv[1], argv[2]
    best = json.loads((tune_dir / "best_recipe.json").read_text(encoding="utf-8"))
    tune = best.pop("_tune")
    if "date" not in tune:  # tune runs started before the date was recorded: the file's time
        mtime = (tune_dir / "best_recipe.json").stat().st_mtime
        tune["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))
    best.pop("_comment", None)
    recipe = {"_comment": comment, "_tune": tune, **best}
    path = ROOT / "src" / "tripletlab" / "recipes" / f"{name}.json"
    path.write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(tune_dir / "trials.md", ROOT / "benchmarks" / "tune" / f"{name}_trials.md")
    shutil.copyfile(tune_dir / "trials.csv", ROOT / "benchmarks" / "tune" / f"{name}_trials.csv")
    print(f"wrote {path} (best validation MAP@R {tune.get('best_value')})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
