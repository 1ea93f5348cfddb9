"""ImageNet MobileNetV2 with no training on AT&T unseen s31-s40: global average pool + cosine.

Checks the built-in weights and the preprocessing (resize, grey -> RGB, ImageNet normalisation)
against the reference figures of ../shared/data/README.md (AUC 0.961 / EER 12.0% at 112x136,
0.982 / 8.2% at 224x272, width x height).

    python benchmarks/pretrained_reference.py [--data ../shared/data/att_faces] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from tripletlab.data import load_dataset
from tripletlab.metrics import retrieval_metrics, verification_metrics
from tripletlab.models.backbones import BackboneEmbedding


def gap_scores(data: str, height: int, width: int, batch: int = 25) -> dict:
    ds = load_dataset(data, image_size=(height, width), grayscale=True)
    test = [i for i, c in enumerate(ds.y.tolist()) if int(ds.classes[c][1:]) >= 31]
    x, y = ds.x[test], ds.y[test]
    model = BackboneEmbedding([1, height, width], backbone="mobilenet_v2", weights="imagenet")
    model.eval()
    with torch.no_grad():
        f = torch.cat([model.features(x[s : s + batch]) for s in range(0, len(x), batch)])
    v = verification_metrics(f, y, distance="cosine")
    r = retrieval_metrics(f, y, ks=(1,), distance="cosine", nmi=False)
    return {
        "auc": v["roc_auc"],
        "eer": v["eer"],
        "p@1": r["precision_at_1"],
        "map@r": r["map_at_r"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/att_faces")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for w, h in ((112, 136), (224, 272)):
        t = time.perf_counter()
        s = gap_scores(args.data, h, w)
        print(
            f"{w}x{h}: ROC AUC {s['auc']:.3f}, EER {100 * s['eer']:.1f}%, P@1 {s['p@1']:.2f}, "
            f"MAP@R {s['map@r']:.3f} ({time.perf_counter() - t:.1f} s)"
        )


if __name__ == "__main__":
    main()
