"""Omniglot small1, grouped open-set protocol: train + validate on 4 alphabets, test on the 5th,
rotating the test alphabet; MAP@R and 20-way 1-shot accuracy of raw pixels and of trained runs.

Usage (from the repository root, PYTHONPATH=src):
    python benchmarks/omniglot_rotation.py --out rot.json raw
    python benchmarks/omniglot_rotation.py --out rot.json train --name defaults \
        --alphabets Greek Korean -- --steps 600 --image-size 28 28 --threads 1
    python benchmarks/omniglot_rotation.py --out rot.json train --name tuned \
        -- --config runs/tune-omniglot/best_recipe.json --threads 1

Each trained run keeps its validation split inside the 4 training alphabets (whole alphabets
with --val-group-depth 1 when given; the default val_fraction otherwise); the test alphabet is
evaluated once, at the end. Results are appended to ``--out`` (JSON: name -> alphabet -> metrics).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

DATA = "../shared/data/omniglot/images_background_small1"
ALPHABETS = ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]


def _metrics(emb, y) -> dict:
    from tripletlab.metrics.evaluate import evaluate_embeddings

    r = evaluate_embeddings(emb, y, "cosine", seed=0)
    return {
        "map_at_r": r["retrieval"]["map_at_r"],
        "one_shot_20way": r["few_shot"]["accuracy"],
        "n_classes": r["n_classes"],
    }


def raw(data: str, alphabets: list[str]) -> dict:
    from tripletlab.data import load_dataset, split_dataset

    ds = load_dataset(data, image_size=(28, 28))
    out = {}
    for a in alphabets:
        _, test, _ = split_dataset(ds, by="class", test_classes=[a])
        out[a] = _metrics(test.x.flatten(1), test.y)
    return out


def train(data: str, alphabets: list[str], name: str, flags: list[str], runs: str) -> dict:
    from tripletlab.cli import main

    out = {}
    for a in alphabets:
        run = Path(runs) / f"{name}-{a}"
        argv = ["train", "--data", data, "--test-classes", a, "--out", str(run), "--quiet",
                "--no-report", *flags]  # fmt: skip
        if main(argv) != 0:
            raise SystemExit(f"training failed: {argv}")
        ev = json.loads((run / "eval.json").read_text())
        out[a] = {
            "map_at_r": ev["retrieval"]["map_at_r"],
            "one_shot_20way": ev["few_shot"]["accuracy"],
            "best_val_map_at_r": ev.get("best_val_map_at_r"),
            "train_time_s": ev["train_time_s"],
            "steps": ev["steps"],
        }
    return out


def main_(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["raw", "train"])
    p.add_argument("--out", required=True)
    p.add_argument("--data", default=DATA)
    p.add_argument("--name", default="raw")
    p.add_argument("--alphabets", nargs="*", default=ALPHABETS)
    p.add_argument("--runs", default="runs/rotation")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    res = (
        raw(args.data, args.alphabets)
        if args.what == "raw"
        else train(args.data, args.alphabets, args.name, extra, args.runs)
    )
    path = Path(args.out)
    allres = json.loads(path.read_text()) if path.exists() else {}
    allres.setdefault(args.name, {}).update(res)
    path.write_text(json.dumps(allres, indent=2))
    for key in ("map_at_r", "one_shot_20way"):
        vals = [r[key] for r in allres[args.name].values()]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        print(f"{args.name} {key}: mean {statistics.mean(vals):.4f} ± {sd:.4f} over {len(vals)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main_())
