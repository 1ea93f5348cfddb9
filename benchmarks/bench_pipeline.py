"""Data-pipeline cost: MobileNetV2 training images/s from JPEG files streamed through the PK
DataLoader (decode + resize + augmentation in worker processes) against a bare PyTorch loop over
the same model, loss and batches on pre-decoded tensors. One run, alternating the two loops
(best of ``--rounds``) so that load from other processes hits both alike. Defaults: 4 rounds of
40 measured steps over 64 classes (2,560 images); the earlier 2 x 12 steps over 16 classes swung
by +-5 points between identical runs.

    python benchmarks/make_jpeg_folder.py /tmp/jpeg20k --n 20000
    python benchmarks/bench_pipeline.py /tmp/jpeg20k --sizes 112 224 --threads 2 --workers 2
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tripletlab.data.streaming import ImageFiles, PKStream, SampleAugment, class_ids, scan_images
from tripletlab.losses import TripletLoss
from tripletlab.models.backbones import BackboneEmbedding
from tripletlab.samplers import PKSampler


def run(size: int, files_all, labels_all, a) -> dict:
    keep = [i for i, y in enumerate(labels_all) if y < a.classes]
    paths = [files_all[i] for i in keep]
    ids = [labels_all[i] for i in keep]
    aug = SampleAugment.from_config(a.augment)
    files = ImageFiles(paths, ids, (size, size), 3, augment=aug)
    x_all = torch.stack([files.decode(i) for i in range(len(files))]).float().div_(255)
    y_all = torch.tensor(ids)
    torch.manual_seed(0)
    model = BackboneEmbedding([3, size, size], backbone="mobilenet_v2", freeze_bn=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = TripletLoss(margin=0.2, strategy="semihard")
    model.train()

    def step(x, y):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def bare() -> float:
        it = iter(PKSampler(y_all, p=a.p, k=a.k, seed=1))
        for _ in range(a.warmup):
            idx = next(it)
            step(x_all[idx], y_all[idx])
        t = time.perf_counter()
        for _ in range(a.steps):
            idx = next(it)
            step(x_all[idx], y_all[idx])
        return a.steps * a.p * a.k / (time.perf_counter() - t)

    def streamed() -> float:
        stream = PKStream(files, PKSampler(files.labels, p=a.p, k=a.k, seed=1), workers=a.workers)
        for _ in range(a.warmup):
            x, y, _ = next(stream)
            step(x, y)
        t = time.perf_counter()
        for _ in range(a.steps):
            x, y, _ = next(stream)
            step(x, y)
        rate = a.steps * a.p * a.k / (time.perf_counter() - t)
        stream.close()
        return rate

    b, s = [], []
    for _ in range(a.rounds):
        b.append(bare())
        s.append(streamed())
    best_b, best_s = max(b), max(s)
    return {
        "size": size,
        "bare_img_s": round(best_b, 1),
        "streamed_img_s": round(best_s, 1),
        "pipeline_cost_pct": round(100 * (1 - best_s / best_b), 1),
        "rounds_bare": [round(v, 1) for v in b],
        "rounds_streamed": [round(v, 1) for v in s],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data")
    ap.add_argument("--sizes", type=int, nargs="+", default=[112, 224])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--p", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--classes", type=int, default=64)
    ap.add_argument("--augment", default="natural")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    paths, labels = scan_images(a.data)
    ids, _ = class_ids(labels)
    for size in a.sizes:
        print(
            json.dumps(
                {
                    **run(size, paths, ids, a),
                    "threads": a.threads,
                    "workers": a.workers,
                    "augment": a.augment,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
