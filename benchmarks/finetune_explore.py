"""Choose the pretrained-faces recipe on VALIDATION identities only (never s31-s40).

Trains MobileNetV2 (ImageNet weights) with triplet loss on AT&T s1-s20 and scores s21-s30
(ROC AUC / EER, cosine) every ``--eval-every`` steps. The identities s31-s40 are not loaded.

    python benchmarks/finetune_explore.py --size 136 112 --steps 300 --lr 1e-3 --bb-mult 0.1
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tripletlab.data import load_dataset
from tripletlab.data.augment import build_augment
from tripletlab.losses import TripletLoss
from tripletlab.metrics import verification_metrics
from tripletlab.models.backbones import BackboneEmbedding
from tripletlab.samplers import PKSampler


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/att_faces")
    ap.add_argument("--size", type=int, nargs=2, default=[136, 112])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--bb-mult", type=float, default=0.1)
    ap.add_argument("--head-warmup", type=int, default=30)
    ap.add_argument("--p", type=int, default=10)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--strategy", default="semihard")
    ap.add_argument("--pool", default="avg")
    ap.add_argument("--neck", action="store_true")
    ap.add_argument("--no-freeze-bn", action="store_true")
    ap.add_argument("--augment", default="faces")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    ds = load_dataset(a.data, image_size=tuple(a.size), grayscale=True)
    ident = torch.tensor([int(ds.classes[c][1:]) for c in ds.y.tolist()])
    tr, va = ident <= 20, (ident >= 21) & (ident <= 30)
    xtr, ytr, xva, yva = ds.x[tr], ds.y[tr], ds.x[va], ds.y[va]
    m = BackboneEmbedding(
        [1, *a.size],
        weights="imagenet",
        pool=a.pool,
        neck=a.neck,
        freeze_bn=not a.no_freeze_bn,
        embedding_dim=a.dim,
    )
    opt = torch.optim.AdamW(m.param_groups(a.lr, a.bb_mult), weight_decay=1e-4)
    base = [g["lr"] for g in opt.param_groups]
    aug = build_augment(a.augment, seed=a.seed)
    loss_fn = TripletLoss(margin=a.margin, strategy=a.strategy, distance="euclidean")
    sampler = PKSampler(ytr, p=a.p, k=a.k, seed=a.seed)

    def score(step):
        m.eval()
        with torch.no_grad():
            e = torch.cat([m(xva[s : s + 50]) for s in range(0, len(xva), 50)])
        m.train()
        v = verification_metrics(e, yva, distance="cosine")
        print(
            json.dumps(
                {
                    "step": step,
                    "val_auc": round(v["roc_auc"], 4),
                    "val_eer": round(v["eer"], 4),
                    "t": round(time.perf_counter() - t0),
                }
            ),
            flush=True,
        )

    t0 = time.perf_counter()
    score(0)
    step = 0
    m.train()
    while step < a.steps:
        for idx in sampler:
            warm = step < a.head_warmup
            m.set_backbone_trainable(not warm)
            import math

            f = 0.5 * (1 + math.cos(math.pi * step / a.steps))
            for g, b in zip(opt.param_groups, base, strict=True):
                g["lr"] = b * f
            x = xtr[idx]
            x = aug(x) if aug is not None else x
            e = m(x)
            loss = loss_fn(e, ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % a.eval_every == 0 or step == a.steps:
                score(step)
            if step >= a.steps:
                break
    print(json.dumps({"args": vars(a), "time_s": round(time.perf_counter() - t0)}))


if __name__ == "__main__":
    main()
