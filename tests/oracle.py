"""Brute-force reference: plain Python loops over every (a, p, n) on a distance matrix.

Used as ground truth by the loss and miner tests. Deliberately simple and slow.
"""

from __future__ import annotations

import math

import torch


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def term(d_ap, d_an, margin: float, soft: bool):
    """Per-triplet loss; works on python floats and on 0-d tensors."""
    if isinstance(d_ap, torch.Tensor):
        if soft:
            return torch.nn.functional.softplus(d_ap - d_an)
        return torch.relu(d_ap - d_an + margin)
    return _softplus(d_ap - d_an) if soft else max(0.0, d_ap - d_an + margin)


def positive_pairs(labels, ref_labels=None, exclude_self=True):
    ref = labels if ref_labels is None else ref_labels
    return [
        (a, p)
        for a in range(len(labels))
        for p in range(len(ref))
        if labels[a] == ref[p] and not (exclude_self and a == p)
    ]


def negatives(labels, a, ref_labels=None):
    ref = labels if ref_labels is None else ref_labels
    return [n for n in range(len(ref)) if ref[n] != labels[a]]


def mined_triplets(dist, labels, strategy, margin, fallback="easiest", ref_labels=None):
    """The triplets a deterministic strategy picks (ties broken by lowest index)."""
    labels = [int(v) for v in labels]
    ref = labels if ref_labels is None else [int(v) for v in ref_labels]
    excl = ref_labels is None
    d = [[float(v) for v in row] for row in dist]
    out = []
    if strategy == "all":
        for a, p in positive_pairs(labels, ref, excl):
            out += [(a, p, n) for n in negatives(labels, a, ref)]
        return out
    if strategy in ("hard", "easy-positive"):
        for a in range(len(labels)):
            ps = [p for (aa, p) in positive_pairs(labels, ref, excl) if aa == a]
            ns = negatives(labels, a, ref)
            if not ps or not ns:
                continue
            if strategy == "hard":
                p = max(ps, key=lambda j: (d[a][j], -j))
            else:
                p = min(ps, key=lambda j: (d[a][j], j))
            n = min(ns, key=lambda j: (d[a][j], j))
            out.append((a, p, n))
        return out
    for a, p in positive_pairs(labels, ref, excl):
        ns = negatives(labels, a, ref)
        if not ns:
            continue
        if strategy == "hardest-negative":
            out.append((a, p, min(ns, key=lambda j: (d[a][j], j))))
        elif strategy == "semihard":
            semi = [n for n in ns if d[a][n] > d[a][p]]
            if semi:
                out.append((a, p, min(semi, key=lambda j: (d[a][j], j))))
            elif fallback == "easiest":
                out.append((a, p, max(ns, key=lambda j: (d[a][j], -j))))
        else:
            raise ValueError(strategy)
    return out


def reference_loss(
    dist, labels, strategy, margin, soft, reduction, fallback="easiest", ref_labels=None
):
    """Reference loss as a torch expression of ``dist`` (so gradients can be compared)."""
    trip = mined_triplets(dist.detach(), labels, strategy, margin, fallback, ref_labels)
    terms = [term(dist[a, p], dist[a, n], margin, soft) for a, p, n in trip]
    if not terms:
        return dist.sum() * 0.0, 0, 0
    stacked = torch.stack(terms)
    n_active = int((stacked > 0).sum())
    if reduction == "sum":
        loss = stacked.sum()
    elif reduction == "mean":
        loss = stacked.sum() / len(terms)
    else:
        loss = stacked.sum() / max(n_active, 1)
    return loss, len(terms), n_active


def reference_distances(emb: torch.Tensor, distance: str, ref: torch.Tensor | None = None):
    """Distance matrix by explicit per-pair differences (no GEMM)."""
    other = emb if ref is None else ref
    rows = []
    for i in range(emb.shape[0]):
        row = []
        for j in range(other.shape[0]):
            x, y = emb[i], other[j]
            if distance == "euclidean":
                sq = ((x - y) ** 2).sum()
                row.append(sq.sqrt() if sq > 0 else sq * 0.0)
            elif distance == "sqeuclidean":
                row.append(((x - y) ** 2).sum())
            else:
                nx, ny = x.norm(), y.norm()
                if nx == 0 or ny == 0:
                    row.append(torch.ones((), dtype=emb.dtype))
                else:
                    row.append((1 - (x @ y) / (nx * ny)).clamp(0, 2))
        rows.append(torch.stack(row) if row else torch.zeros(0, dtype=emb.dtype))
    if not rows:
        return torch.zeros(0, other.shape[0], dtype=emb.dtype)
    out = torch.stack(rows)
    if ref is None:
        out = out * (1 - torch.eye(out.shape[0], dtype=out.dtype))
    return out
