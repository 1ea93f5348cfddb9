"""Which retrieval post-processing to use, chosen on validation classes, and the retrieval
metrics after it.

Post-processing (:mod:`tripletlab.metrics.postprocess`) helps on some data and hurts on other:
k-reciprocal re-ranking moved Market-1501 mAP from 70.4 to 84.5 (Zhong et al., CVPR 2017) but
lost on product retrieval. :func:`choose_postprocess` therefore scores none and a small grid
(:func:`postprocess_candidates`) on held-out validation classes, leave-one-out (every item a
query against all the others, exactly as :func:`postprocessed_metrics` scores a test split), and
keeps the best candidate only if its MAP@R gain over none is larger than the validation noise:

    gain = MAP@R(candidate) - MAP@R(none),   kept  iff  gain > max(z * SE, min_gain)

``SE`` is the paired bootstrap standard error of the gain over validation *classes* (classes
resampled with replacement, ``n_boot`` draws; a class's queries move together, since items of one
class are not independent). Picking the largest of 12 noisy gains is biased upwards; ``z = 2``
and ``min_gain`` keep that bias from turning noise into a choice. When nothing passes, the answer
is ``none``, and that is a correct answer.

Example:
    >>> import torch
    >>> from tripletlab.metrics.postprocess_select import choose_postprocess
    >>> y = torch.arange(8).repeat_interleave(6)
    >>> emb = torch.nn.functional.one_hot(y, 8).float() + 0.3 * torch.randn(48, 8)
    >>> choice = choose_postprocess(emb, y, distance="cosine", n_boot=50)
    >>> choice["method"] in ("none", "aqe", "dba", "dba+aqe", "rerank")
    True
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, check_ks
from .postprocess import PostProcess, apply_postprocess, parse_postprocess
from .retrieval import ranking_metrics

__all__ = ["choose_postprocess", "postprocess_candidates", "postprocessed_metrics"]

#: the full ranking (mAP, mINP) of a post-processed set is searched up to this many items
FULL_RANKING_MAX_ITEMS = 4096


def postprocess_candidates(labels: Any) -> list[PostProcess]:
    """The grid :func:`choose_postprocess` tries besides none: alpha-QE (k 1, 2, 3, 5), DBA
    and DBA + alpha-QE (k 2, 3, 5), all alpha 3 (Radenovic et al.'s value), and k-reciprocal
    re-ranking with the paper's (k1 20, k2 6, lambda 0.3) and with k1 the median class size
    (small classes: a k1 far above the class size fills R* with other classes).

    Example:
        >>> [str(c) for c in postprocess_candidates([0, 0, 0, 1, 1, 1])][-1]
        'rerank:k1=3,k2=1,lambda=0.3'
    """
    y = as_labels(labels, len(labels))
    med = int(torch.unique(y, return_counts=True)[1].double().median().round()) if len(y) else 1
    texts = [f"aqe:k={k}" for k in (1, 2, 3, 5)]
    texts += [f"{m}:k={k}" for m in ("dba", "dba+aqe") for k in (2, 3, 5)]
    k1 = min(20, max(3, med))
    texts += ["rerank:k1=20,k2=6,lambda=0.3", f"rerank:k1={k1},k2={max(1, k1 // 3)},lambda=0.3"]
    out: list[PostProcess] = []
    for t in texts:
        spec = parse_postprocess(t)
        if spec not in out:
            out.append(spec)
    return out


def _search_k(labels: torch.Tensor, ks: Sequence[int], n: int, groups: Any = None) -> int:
    """Neighbours to search: enough for R-Precision and MAP@R (the largest class), or the full
    ranking for small sets (mAP, mINP); with groups, room for the own-group items dropped."""
    if n <= FULL_RANKING_MAX_ITEMS:
        return max(1, n - 1)
    need = max(int(torch.unique(labels, return_counts=True)[1].max()) - 1, max(ks))
    if groups is not None:
        need += int(np.unique(np.asarray(groups), return_counts=True)[1].max())
    return max(1, min(n - 1, need))


def postprocessed_metrics(
    embeddings: Any,
    labels: Any,
    spec: str | PostProcess,
    *,
    distance: str = "cosine",
    ks: Sequence[int] = (1, 2, 4, 8),
    groups: Any = None,
    per_query: bool = False,
) -> dict:
    """Leave-one-out retrieval metrics (the keys of :func:`~tripletlab.metrics.retrieval_metrics`)
    after post-processing ``spec``: every item a query against all the others, the gallery
    post-processed without it (see :func:`~tripletlab.metrics.postprocess.apply_postprocess`),
    scored by :func:`~tripletlab.metrics.retrieval.ranking_metrics`. ``"none"`` gives the plain
    k-NN numbers. Sets of at most ``FULL_RANKING_MAX_ITEMS`` items are ranked in full (mAP,
    mINP); larger ones to the largest class (R-metrics exact). ``groups``: the evaluation groups
    of the re-identification protocol (own-group items are dropped from a query's ranking).

    Example:
        >>> import torch
        >>> y = torch.arange(4).repeat_interleave(3)
        >>> emb = torch.nn.functional.one_hot(y, 4).float() + 0.1 * torch.randn(12, 4)
        >>> postprocessed_metrics(emb, y, "dba:k=2")["precision_at_1"]
        1.0
    """
    check_distance(distance)
    emb = as_embeddings(embeddings)
    y = as_labels(labels, emb.shape[0])
    ks = check_ks(ks)
    if emb.shape[0] < 2:
        raise InputError("post-processed retrieval metrics need at least 2 items")
    k = _search_k(y, ks, emb.shape[0], groups)  # never above the candidates: no clamp note
    # a spec's own k above the set is clamped by apply_postprocess, with its warning
    _, idx = apply_postprocess(spec, emb, emb, k=k, distance=distance, exclude_self=True)
    return ranking_metrics(idx, y, y, ks=ks, exclude_self=True, groups=groups, per_query=per_query)


def _subsample_classes(y: torch.Tensor, max_items: int, seed: int) -> torch.Tensor:
    """Indices of whole classes drawn at random until ``max_items`` (a class keeps all its
    items: subsampling within classes would change R and the task)."""
    if len(y) <= max_items:
        return torch.arange(len(y))
    classes = torch.unique(y).numpy()
    rng = np.random.default_rng(seed)
    rng.shuffle(classes)
    counts = torch.bincount(y - y.min()).numpy()
    keep, total = [], 0
    for c in classes:
        n_c = int(counts[int(c) - int(y.min())])
        if total + n_c > max_items and keep:
            continue
        keep.append(c)
        total += n_c
    return torch.nonzero(torch.isin(y, torch.as_tensor(np.array(keep)))).flatten()


def _class_means(values: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum of values, count) per class over the queries with a value (not NaN)."""
    ok = np.isfinite(values)
    codes = np.unique(y, return_inverse=True)[1]
    n_cls = int(codes.max()) + 1 if len(codes) else 0
    sums = np.bincount(codes[ok], weights=values[ok], minlength=n_cls)
    counts = np.bincount(codes[ok], minlength=n_cls).astype(np.float64)
    return sums, counts


def _bootstrap_se(sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int) -> float:
    """Bootstrap standard error of sum(sums) / sum(counts), classes resampled."""
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if len(counts) < 2:
        return float("inf")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(counts), size=(n_boot, len(counts)))
    est = sums[draws].sum(1) / counts[draws].sum(1)
    return float(est.std(ddof=1))


def choose_postprocess(
    embeddings: Any,
    labels: Any,
    *,
    distance: str = "cosine",
    candidates: Sequence[str | PostProcess] | None = None,
    max_items: int = 4000,
    n_boot: int = 1000,
    z: float = 2.0,
    min_gain: float = 0.001,
    seed: int = 0,
) -> dict:
    """The post-processing to use, chosen on validation embeddings (held-out classes): the
    candidate with the largest leave-one-out MAP@R gain over none, kept only if the gain exceeds
    ``max(z * SE, min_gain)`` (module docstring), else none.

    Returns a JSON-able dict: ``method``, ``params``, ``spec`` (its text), ``chosen_by``
    (``"validation"``), ``validation_map_at_r_none``, ``validation_map_at_r`` (of the choice),
    ``validation_gain`` and ``validation_gain_se`` (of the best candidate, chosen or not),
    ``rule``, ``validation_items``, ``validation_classes``, ``candidates`` (each one's spec,
    MAP@R, gain, SE, its P@1 change ``p1_gain`` and seconds) and ``seconds``. The choice is by
    MAP@R: re-ranking can gain MAP@R and lose top-1 (see docs/retrieval.md); ``p1_gain`` says
    what a candidate did to P@1 on validation. Sets above ``max_items`` are scored on whole
    classes drawn at random (``seed``) up to that size.
    """
    check_distance(distance)
    t_start = time.perf_counter()
    emb = as_embeddings(embeddings)
    y = as_labels(labels, emb.shape[0])
    pick = _subsample_classes(y, max_items, seed)
    emb, y = emb[pick], y[pick]
    specs = [parse_postprocess(c) for c in (candidates or postprocess_candidates(y))]
    specs = [s for s in specs if s.method != "none"]
    rule = (
        f"the best candidate if its MAP@R gain over none exceeds max({z:g} x its bootstrap SE "
        f"({n_boot} draws over validation classes), {min_gain:g}), else none"
    )
    out: dict[str, Any] = {
        "method": "none",
        "params": {},
        "spec": "none",
        "chosen_by": "validation",
        "rule": rule,
        "validation_items": int(len(y)),
        "validation_classes": int(torch.unique(y).numel()),
    }
    try:
        base = postprocessed_metrics(emb, y, "none", distance=distance, ks=(1,), per_query=True)
    except InputError as e:
        out["skipped"] = f"no validation retrieval: {e}"
        return out
    y_np = y.numpy()
    none_q = base["per_query"]["map_at_r"]
    out["validation_map_at_r_none"] = out["validation_map_at_r"] = float(base["map_at_r"])
    rows, best = [], None
    for spec in specs:
        t0 = time.perf_counter()
        with warnings.catch_warnings():  # a grid k above a small validation set: clamped
            warnings.simplefilter("ignore", UserWarning)
            m = postprocessed_metrics(emb, y, spec, distance=distance, ks=(1,), per_query=True)
        sums, counts = _class_means(m["per_query"]["map_at_r"] - none_q, y_np)
        gain = float(m["map_at_r"] - base["map_at_r"])
        se = _bootstrap_se(sums, counts, n_boot, seed)
        row = {
            "spec": str(spec),
            "map_at_r": float(m["map_at_r"]),
            "gain": gain,
            "gain_se": se if math.isfinite(se) else None,  # None: < 2 classes, no estimate
            "p1_gain": float(m["precision_at_1"] - base["precision_at_1"]),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        rows.append(row)
        if best is None or gain > best[1]["gain"]:
            best = (spec, row)
    out["candidates"] = rows
    if best is not None:
        spec, row = best
        out["validation_gain"], out["validation_gain_se"] = row["gain"], row["gain_se"]
        out["best_candidate"] = row["spec"]
        if row["gain_se"] is not None and row["gain"] > max(z * row["gain_se"], min_gain):
            out.update(
                method=spec.method,
                params=dict(spec.params),
                spec=str(spec),
                validation_map_at_r=row["map_at_r"],
            )
    out["seconds"] = round(time.perf_counter() - t_start, 3)
    return out
