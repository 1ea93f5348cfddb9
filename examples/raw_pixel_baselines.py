"""Raw-pixel reference points, computed with tripletlab's own metrics.

    python examples/raw_pixel_baselines.py

Reproduces the raw-pixel rows of ../shared/data/README.md (AT&T faces 46x56, cosine, all pairs of
s31-s40) as a check of the metrics, and gives the raw-pixel baselines for Omniglot (held-out
alphabet) and Fashion-MNIST (test -> train Recall@1).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tripletlab.data import load_dataset, split_dataset
from tripletlab.metrics import few_shot_accuracy, retrieval_metrics, verification_metrics

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def flat(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.flatten(1), dim=1)


def main() -> int:
    att = load_dataset(str(DATA / "att_faces"), image_size=(56, 46))
    _, test, _ = split_dataset(att, by="class", test_classes=[f"s{i}" for i in range(31, 41)])
    v = verification_metrics(flat(test.x), test.y, distance="cosine")
    r = retrieval_metrics(flat(test.x), test.y, distance="cosine", nmi=False)
    print(
        f"AT&T raw pixels 46x56: ROC AUC {v['roc_auc']:.3f}, EER {100 * v['eer']:.1f}%, "
        f"P@1 {r['precision_at_1']:.2f}, MAP@R {r['map_at_r']:.3f} "
        f"({v['n_pairs_same']} same / {v['n_pairs_diff']} different pairs)"
    )
    om = load_dataset(str(DATA / "omniglot" / "images_background_small1"), image_size=(28, 28))
    hold = sys.argv[1] if len(sys.argv) > 1 else "Latin"
    _, test, _ = split_dataset(om, by="class", test_classes=[hold])
    r = retrieval_metrics(flat(test.x), test.y, distance="cosine", nmi=False)
    fs = few_shot_accuracy(
        flat(test.x), test.y, n_way=20, k_shot=1, n_query=5, n_episodes=500, distance="cosine"
    )
    print(
        f"Omniglot raw pixels 28x28, held-out {hold} ({len(set(test.y.tolist()))}"
        f" characters): MAP@R {r['map_at_r']:.3f}, P@1 {r['precision_at_1']:.3f}, "
        f"20-way 1-shot {fs['accuracy']:.3f} ± {fs['ci95']:.3f}"
    )
    fm = load_dataset(str(DATA / "fashion-mnist"))
    train, test, _ = split_dataset(fm, by="predefined")
    r = retrieval_metrics(
        train.x.flatten(1),
        train.y,
        query_embeddings=test.x.flatten(1),
        query_labels=test.y,
        distance="euclidean",
        ks=(1,),
        nmi=False,
    )
    print(
        f"Fashion-MNIST raw pixels: test -> train Recall@1 {r['recall_at_1']:.3f} "
        f"(MAP@R {r['map_at_r']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
