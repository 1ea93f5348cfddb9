"""Fine-tuning the last MobileNetV2 stage with and without the cache of the frozen blocks'
output, in one run: training images/s and whole-command wall time (cache build included).

    python benchmarks/bench_prefix_cache.py --data ../shared/data/att_faces --steps 40

Both runs train the same batches (the cached one runs blocks 14-16 + head per step, the other
the whole backbone, frozen blocks without gradients); test_backbone_train.py checks that they
give the same model.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import tripletlab.train.build as ts
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config


def run(data: str, steps: int, threads: int, cached: bool, out: str) -> dict:
    ts.PREFIX_CACHE_BYTES = 2 << 30 if cached else 0
    cfg = resolve_config(
        None,
        {
            "data": data,
            "out": out,
            "backbone": "mobilenet_v2",
            "pretrained": True,
            "freeze_stages": 4,
            "feature_blocks": [15, 16],
            "tta": "flip",
            "head_init": "whiten",
            "embedding_dim": 320,
            "augment": "flip",
            "image_size": [272, 224],
            "p": 10,
            "k": 4,
            "steps": steps,
            "val_fraction": 0.0,
            "threads": threads,
            "report": False,
            "quiet": True,
            "evaluate": False,
        },
    )
    t = time.perf_counter()
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    wall = time.perf_counter() - t
    rate = trainer.clock.step_samples / max(trainer.clock.step_seconds, 1e-9)
    return {"cached": cached, "train_img_s": round(rate, 1), "wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    rows = []
    for cached in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run(a.data, a.steps, a.threads, cached, tmp))
        print(json.dumps({**rows[-1], "steps": a.steps, "threads": a.threads}), flush=True)
    print(json.dumps({"step_speedup": round(rows[0]["train_img_s"] / rows[1]["train_img_s"], 1)}))


if __name__ == "__main__":
    main()
