"""Write a synthetic image folder ROOT/<class>/<i>.jpg of N JPEGs (default 224x224) for memory
and throughput measurements. Each class has its own random colour blobs; each image adds noise
and a shift, so images compress like photos (~10 KB) rather than like flat colour.

    python benchmarks/make_jpeg_folder.py /tmp/jpeg20k --n 20000 --classes 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_folder(root: Path, n: int, classes: int, size: int = 224, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for c in range(classes):
        (root / f"class{c:05d}").mkdir(parents=True, exist_ok=True)
    protos = []
    for _ in range(classes):
        img = np.zeros((size, size, 3), np.float32)
        for _ in range(4):
            cx, cy, r = rng.random(3) * [1, 1, 0.3] + [0, 0, 0.05]
            col = rng.random(3) * 255
            img += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / r**2)[..., None] * col
        protos.append(img)
    for i in range(n):
        c = i % classes
        shift = rng.integers(-8, 9, 2)
        img = np.roll(protos[c], tuple(shift), axis=(0, 1))
        img = img + rng.normal(0, 12, img.shape).astype(np.float32)
        arr = np.clip(img, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(root / f"class{c:05d}" / f"{i:06d}.jpg", quality=85)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--classes", type=int, default=500)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    t = time.perf_counter()
    make_folder(a.root, a.n, a.classes, a.size, a.seed)
    print(f"wrote {a.n} JPEGs in {a.classes} classes to {a.root} ({time.perf_counter() - t:.0f} s)")


if __name__ == "__main__":
    main()
