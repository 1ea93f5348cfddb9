"""The cross-domain face protocol of issue #23 (docs/training.md, "Cross-domain").

Two face sources, fixed person splits (never chosen by a test score):

- AT&T (``../shared/data/att_faces``): s1-s25 train, s26-s30 validation, s31-s40 test;
- Extended Yale B (``../shared/data/extended_yale_b``, 27 people in sorted name order):
  the first 15 train, the next 5 validation, the last 7 test.

Stage 1 (``features``) caches ImageNet MobileNetV2 features of every photo (and of its mirror
image) per block and input size in /work/cache/face_protocol/; stage 2 (``search``) scores the
candidates on the validation people of both sources; stage 3 (``test``) scores the test people
of both sources once for the untrained backbone, today's pretrained recipe and the chosen one.

    nice -n 10 python benchmarks/face_protocol.py features
    nice -n 10 python benchmarks/face_protocol.py search
    nice -n 10 python benchmarks/face_protocol.py test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tripletlab.data.open import open_data
from tripletlab.models.backbones import BackboneEmbedding

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / ".." / "shared" / "data").resolve()
if not DATA.exists():
    DATA = Path("/work/shared/data")
CACHE = Path("/work/cache/face_protocol")
SOURCES = {"att": DATA / "att_faces", "yale": DATA / "extended_yale_b"}
SIZES = ([136, 112], [272, 224])
TAPS = list(range(12, 19))  # MobileNetV2 blocks whose pooled outputs are cached


def att_split(name: str) -> str:
    """AT&T person ``sN``: train N <= 25, validation 26-30, test 31-40."""
    n = int(name[1:])
    return "train" if n <= 25 else "val" if n <= 30 else "test"


def yale_split(names: list[str]) -> dict[str, str]:
    """Extended Yale B people in sorted order: first 15 train, next 5 validation, last 7 test."""
    order = sorted(names, key=lambda s: int(s.replace("yaleB", "")))
    return {n: "train" if i < 15 else "val" if i < 20 else "test" for i, n in enumerate(order)}


def cache_path(source: str, size) -> Path:
    return CACHE / f"{source}_{size[0]}x{size[1]}.pt"


@torch.no_grad()
def extract(source: str, size, batch: int = 32) -> dict:
    """Pooled (average) outputs of MobileNetV2 blocks :data:`TAPS` of every photo and its
    mirror image, with the library's image loading and ImageNet normalisation."""
    ds, _, _ = open_data(str(SOURCES[source]), image_size=size, stream=False, explain=False)
    model = BackboneEmbedding([1, *size], backbone="mobilenet_v2", weights="imagenet",
                              freeze_stages="all", blocks=[TAPS[-1]]).eval()  # fmt: skip
    blocks = model.backbone.blocks()
    out = {"y": ds.y, "classes": ds.classes, "paths": ds.paths, "size": list(size)}
    for mirror in (False, True):
        feats = {b: [] for b in TAPS}
        for i in range(0, len(ds), batch):
            x = ds.x[i : i + batch]
            x = model._normalize_input(x.flip(-1) if mirror else x)
            for j, block in enumerate(blocks[: TAPS[-1] + 1]):
                x = block(x)
                if j in feats:
                    feats[j].append(x.mean(dim=(2, 3)))
        out["mirror" if mirror else "image"] = {b: torch.cat(v) for b, v in feats.items()}
    return out


def stage_features() -> None:
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    for size in SIZES:
        for source in SOURCES:
            p = cache_path(source, size)
            if p.exists():
                print(f"{p}: cached")
                continue
            t = time.perf_counter()
            obj = extract(source, size)
            tmp = p.with_suffix(".tmp")
            torch.save(obj, tmp)
            tmp.replace(p)
            print(f"{p}: {len(obj['y'])} photos in {time.perf_counter() - t:.0f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["features", "search", "test"])
    args = ap.parse_args(argv)
    if args.stage == "features":
        stage_features()
    return 0


if __name__ == "__main__":
    sys.exit(main())
