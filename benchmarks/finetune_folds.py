"""Fine-tuning the last MobileNetV2 stages vs the frozen recipe, on validation folds only.

Every configuration trains on 20 of AT&T's s1-s30 and is scored on the other 10 (3 folds:
s1-10, s11-20, s21-30), through the product's own ``Trainer`` (``--freeze-stages N`` caches
the frozen blocks' output once, mirror images included, and trains the later blocks + head on
it). s31-s40 are never read: the script links s1-s30 into a folder of their own.

    python benchmarks/finetune_folds.py --data ../shared/data/att_faces --out /tmp/ft-folds \\
        --configs frozen ft4 ft4_lr3 ft4_600

Prints one JSON line per (configuration, fold) and a summary per configuration (mean AUC,
EER, TAR at FAR 0.1%); chosen a priori: lower mean EER wins if the mean AUC is not lower.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from tripletlab.train import Trainer
from tripletlab.train.config import load_config_file, resolve_config

FOLDS = [[f"s{i}" for i in range(a, a + 10)] for a in (1, 11, 21)]
FT = {"freeze_stages": 4, "augment": "flip"}
CONFIGS: dict[str, dict] = {
    "frozen": {},  # the shipped recipe: whole backbone frozen, whitened head, 300 steps
    "ft4": {**FT},  # + blocks 14-16 fine-tuned at lr x 0.3 (the default backbone_lr_mult)
    "ft4_lr1": {**FT, "backbone_lr_mult": 0.1},
    "ft4_600": {**FT, "steps": 600},
    "ft4_hard": {**FT, "strategy": "hard", "soft_margin": True},
    "ft4_lr01": {**FT, "backbone_lr_mult": 0.01},
    "ft4_lr0": {**FT, "backbone_lr_mult": 0.0},  # control: the cached-maps path, nothing moves
    "ft4_60": {**FT, "steps": 60},
    "ft3": {"freeze_stages": 3, "augment": "flip"},
}
# issue 28's value question: does a bigger mined batch pay at equal training examples (= equal
# time on the plain path: time per step is linear in B here)? ft4_lr01 (the best fine-tuning
# above: B = 10 x 4 = 40, 300 steps = 12,000 examples) at B = 20, 80 and 200 (20 people are
# all a fold trains on), and B = 200 through gradient caching in chunks of 40 (exact: the same
# gradients, so the same figures up to float rounding, in the memory of B = 40).
_LR01 = {**FT, "backbone_lr_mult": 0.01}
CONFIGS.update(
    {
        "b20": {**_LR01, "p": 5, "k": 4, "steps": 600},
        "b40": {**_LR01, "p": 10, "k": 4, "steps": 300},
        "b80": {**_LR01, "p": 20, "k": 4, "steps": 150},
        "b200": {**_LR01, "p": 20, "k": 10, "steps": 60},
        "b200_chunk40": {**_LR01, "p": 20, "k": 10, "steps": 60, "chunk_size": 40},
    }
)


def link_folder(data: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(1, 31):
        link = dest / f"s{i}"
        if not link.exists():
            os.symlink((data / f"s{i}").resolve(), link)
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", default="/tmp/ft-folds")
    ap.add_argument("--configs", nargs="+", default=["frozen", "ft4"])
    ap.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    out = Path(a.out)
    folder = link_folder(Path(a.data), out / "s1_s30")
    base = load_config_file("att_faces_pretrained")
    base = {k: v for k, v in base.items() if not k.startswith("_")}
    summary = {}
    for name in a.configs:
        rows = []
        for f in a.folds:
            opts = {
                **base,
                **CONFIGS[name],
                "data": str(folder),
                "test_classes": FOLDS[f],
                "out": str(out / f"{name}-fold{f}"),
                "threads": a.threads,
                "progress_every": 0,
            }
            t = time.time()
            res = Trainer(resolve_config(None, opts), log=lambda *_: None).fit()
            v = res["verification"]
            row = {
                "config": name,
                "fold": f,
                "auc": round(v["roc_auc"], 5),
                "eer": round(v["eer"], 4),
                "tar_far_0.1%": round(v["tar_at_far"][0.001], 4),
                "map_at_r": round(res["retrieval"]["map_at_r"], 4),
                "train_s": round(res["train_time_s"], 1),
                "wall_s": round(time.time() - t, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        n = len(rows)
        summary[name] = {
            k: round(sum(r[k] for r in rows) / n, 5) for k in ("auc", "eer", "tar_far_0.1%")
        }
        print(json.dumps({"config": name, "mean_over_folds": summary[name]}), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
