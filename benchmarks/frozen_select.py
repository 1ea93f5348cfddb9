"""Choose the frozen-backbone face recipe on VALIDATION identities only (never s31-s40).

The ImageNet MobileNetV2 stays frozen, so the pooled outputs of its blocks are computed once per
input size (images and mirror images of s1-s30; s31-s40 are not loaded). Then, for each set of
blocks, embedding size (whitened dimensions), whitening shrinkage and test-time flip, the head
is tripletlab's own (``BackboneEmbedding.init_whitening`` + ``head``), fitted on 20 identities
and scored on the other 10 (ROC AUC / EER, cosine), in 3 folds over s1-s30 (s1-10, s11-20,
s21-30). Prints the mean over folds, best first.

    python benchmarks/frozen_select.py --data ../shared/data/att_faces --size 272 224
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
import torch.nn.functional as F

from tripletlab.data import load_dataset
from tripletlab.metrics import verification_metrics
from tripletlab.models.backbones import BackboneEmbedding


def block_features(data: str, size: tuple[int, int], taps: list[int]) -> tuple[dict, torch.Tensor]:
    """``({(block, mirror): pooled features}, identity numbers)`` of s1-s30."""
    ds = load_dataset(data, image_size=size, grayscale=True)
    ident = torch.tensor([int(ds.classes[c][1:]) for c in ds.y.tolist()])
    keep = ident <= 30  # the test identities s31-s40 are never touched
    x, ident = ds.x[keep], ident[keep]
    m = BackboneEmbedding([1, *size], weights="imagenet", blocks=taps).eval()
    out: dict = {}
    with torch.no_grad():
        for mirror in (False, True):
            feats = []
            for s in range(0, len(x), 25):
                xb = x[s : s + 25]
                feats.append(m.features(xb.flip(-1) if mirror else xb))
            f = torch.cat(feats)
            start = 0
            for b, w in zip(taps, _widths(m, taps), strict=True):
                out[(b, mirror)] = f[:, start : start + w]
                start += w
    return out, ident


def _widths(m: BackboneEmbedding, taps: list[int]) -> list[int]:
    x, widths = torch.zeros(1, 3, 32, 32), []
    with torch.no_grad():
        for i, block in enumerate(m.backbone.blocks()[: max(taps) + 1]):
            x = block(x)
            if i in taps:
                widths.append(x.shape[1])
    return widths


def fold_scores(feats, ident, blocks, dim, shrink, tta) -> tuple[float, float]:
    """Mean ROC AUC and EER over the 3 identity folds of s1-s30."""
    f = torch.cat([feats[(b, False)] for b in blocks], 1)
    fm = torch.cat([feats[(b, True)] for b in blocks], 1)
    aucs, eers = [], []
    for lo in (1, 11, 21):
        va = (ident >= lo) & (ident < lo + 10)
        head = BackboneEmbedding([1, 32, 32], blocks=blocks, embedding_dim=dim).eval()
        head.init_whitening(torch.cat([f[~va], fm[~va]]), shrink=shrink)
        with torch.no_grad():
            e = head.head(f[va], fm[va] if tta == "flip" else None)
        v = verification_metrics(e, ident[va], distance="cosine")
        aucs.append(v["roc_auc"])
        eers.append(v["eer"])
    return sum(aucs) / 3, sum(eers) / 3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/att_faces")
    ap.add_argument("--size", type=int, nargs=2, default=[272, 224], metavar=("H", "W"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--top", type=int, default=20)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    taps = list(range(10, 19))
    t = time.perf_counter()
    feats, ident = block_features(a.data, tuple(a.size), taps)
    print(f"features of s1-s30 at {a.size[0]}x{a.size[1]}: {time.perf_counter() - t:.0f} s")
    # each block's pooled features are L2-normalised inside BackboneEmbedding.features
    block_sets = [[b] for b in taps] + [[15, 16], [13, 16], [12, 16], [16, 17], [10, 13, 16]]
    rows = []
    for blocks, dim, shrink, tta in itertools.product(
        block_sets, (64, 128, 192, 320), (0.1, 0.3), ("none", "flip")
    ):
        auc, eer = fold_scores(feats, ident, blocks, dim, shrink, tta)
        rows.append((auc, eer, blocks, dim, shrink, tta))
    # the untrained baseline: the final layer, average-pooled, cosine
    for blocks in ([18], [15, 16]):
        f = torch.cat([F.normalize(feats[(b, False)], dim=1) for b in blocks], 1)
        aucs = [
            verification_metrics(f[m], ident[m], distance="cosine")["roc_auc"]
            for m in ((ident >= lo) & (ident < lo + 10) for lo in (1, 11, 21))
        ]
        print(f"no head, blocks {blocks}: mean AUC {sum(aucs) / 3:.4f}")
    rows.sort(key=lambda r: -r[0])
    for auc, eer, blocks, dim, shrink, tta in rows[: a.top]:
        print(
            f"AUC {auc:.4f}  EER {100 * eer:5.2f}%  blocks {blocks}  dim {dim}  "
            f"shrink {shrink}  tta {tta}"
        )


if __name__ == "__main__":
    main()
