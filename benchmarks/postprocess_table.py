"""The docs/retrieval.md table: a trained run's post-processing choice on its validation classes
and its test split raw vs post-processed, from the run directory alone.

    python benchmarks/postprocess_table.py runs/att runs/omniglot ...   # one JSON line per run

For each run: the data of its config, the saved split (split.json: test, then validation inside
the training part), both embedded with the best weights; :func:`choose_postprocess` on the
validation embeddings (what ``tripletlab train`` runs at its end), then the test split's
leave-one-out metrics raw and after the choice, scored once (each candidate's validation P@1
change is in its record: re-ranking trades top-1 for MAP@R on some sets). A run
without a validation split is reported as such (nothing to choose on: none).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tripletlab.data import apply_split
from tripletlab.inference import Inference
from tripletlab.metrics import choose_postprocess, postprocessed_metrics, retrieval_metrics
from tripletlab.rundir.files import load_dataset_for_run, read_json

KEYS = ("precision_at_1", "map_at_r", "mean_average_precision", "minp")


def splits(inf: Inference):
    cfg = inf.config
    ds = load_dataset_for_run(cfg, cfg.get("train", {}).get("data"), False)
    info = read_json(inf.run_dir / "split.json", "split")
    train, test = apply_split(ds, info["test"])
    val = apply_split(train, info["val"])[1] if info.get("val") else None
    return val, test


def table_row(run: str) -> dict:
    t0 = time.perf_counter()
    inf = Inference.from_run(run)
    val, test = splits(inf)
    dist = inf.distance
    row: dict = {"run": run, "distance": dist}
    temb, ty = torch.from_numpy(inf.embed_dataset(test)), test.y
    raw = retrieval_metrics(temb, ty, ks=(1,), distance=dist, nmi=False)
    row["test_items"], row["test_classes"] = len(ty), int(torch.unique(ty).numel())
    row["test_raw"] = {k: raw[k] for k in KEYS if k in raw}
    if val is None or len(val) < 2:
        row["choice"] = "none (no validation split)"
        return row
    vemb, vy = torch.from_numpy(inf.embed_dataset(val)), val.y
    choice = choose_postprocess(vemb, vy, distance=dist)
    row["choice"] = choice["spec"]
    row["validation"] = {
        k: choice.get(k)
        for k in ("validation_items", "validation_classes", "validation_map_at_r_none",
                  "validation_gain", "validation_gain_se", "best_candidate")
    }  # fmt: skip
    row["candidates"] = choice["candidates"]
    post = postprocessed_metrics(temb, ty, choice["spec"], distance=dist, ks=(1,))
    row["test_post"] = {k: post[k] for k in KEYS if k in post}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+")
    args = ap.parse_args()
    for run in args.runs:
        print(json.dumps(table_row(run)), flush=True)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
