"""N-way K-shot nearest-prototype classification (Snell et al. 2017 protocol) on embeddings."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..distances import distance_matrix, normalize_rows
from ..errors import InputError
from ..validation import as_embeddings, as_labels, check_distance, check_k

__all__ = ["few_shot_accuracy"]


def few_shot_accuracy(
    embeddings,
    labels,
    *,
    n_way: int = 5,
    k_shot: int = 1,
    n_query: int = 5,
    n_episodes: int = 500,
    seed: int = 0,
    distance: str = "cosine",
) -> dict:
    """Mean accuracy over random episodes and its 95% confidence half-width.

    Each episode draws ``n_way`` classes (among those with >= k_shot + n_query items), ``k_shot``
    support and ``n_query`` query items per class; a query is assigned to the class whose
    prototype (mean support embedding) is nearest (Snell et al. 2017, "Prototypical Networks";
    with ``distance="cosine"`` the prototypes are the normalised means). Ties go to the first
    class of the episode. ``ci95 = 1.96 * std / sqrt(n_episodes)`` with the population std of
    the per-episode accuracies. Episodes are drawn with ``rng = numpy.random.default_rng(seed)``:
    ``rng.choice(eligible_classes, n_way, replace=False)`` (classes in increasing order), then per
    chosen class ``rng.choice(its_items, k_shot + n_query, replace=False)`` (items in increasing
    index order); the first ``k_shot`` are the support set, the rest the queries.

    Example:
        >>> import numpy as np
        >>> from tripletlab.metrics import few_shot_accuracy
        >>> y = np.repeat(np.arange(6), 4)
        >>> emb = np.eye(6)[y] + 0.01 * np.random.default_rng(0).normal(size=(24, 6))
        >>> few_shot_accuracy(emb, y, n_way=5, k_shot=1, n_query=3, n_episodes=20)["accuracy"]
        1.0
    """
    check_distance(distance)
    emb = as_embeddings(embeddings).double()
    y = as_labels(labels, emb.shape[0]).numpy()
    for name, v, lo in (
        ("n_way", n_way, 2),
        ("k_shot", k_shot, 1),
        ("n_query", n_query, 1),
        ("n_episodes", n_episodes, 1),
    ):
        check_k(v, name, minimum=lo)
    if distance == "cosine":
        emb = normalize_rows(emb)
    classes, counts = np.unique(y, return_counts=True)
    eligible = classes[counts >= k_shot + n_query]
    if len(eligible) < n_way:
        raise InputError(
            f"{n_way}-way {k_shot}-shot with {n_query} queries needs {n_way} classes with >= "
            f"{k_shot + n_query} items; only {len(eligible)} qualify"
        )
    by_class = {int(c): np.flatnonzero(y == c) for c in eligible}
    rng = np.random.default_rng(seed)
    accs = np.empty(n_episodes)
    for e in range(n_episodes):
        chosen = rng.choice(eligible, size=n_way, replace=False)
        protos, queries, q_lab = [], [], []
        for ci, c in enumerate(chosen):
            idx = rng.choice(by_class[int(c)], size=k_shot + n_query, replace=False)
            protos.append(emb[idx[:k_shot]].mean(0))
            queries.append(emb[idx[k_shot:]])
            q_lab += [ci] * n_query
        p = torch.stack(protos)
        if distance == "cosine":
            p = normalize_rows(p)
        d = distance_matrix(torch.cat(queries), p, distance)
        accs[e] = float((d.argmin(1).numpy() == np.asarray(q_lab)).mean())
    return {
        "accuracy": float(accs.mean()),
        "ci95": float(1.96 * accs.std() / math.sqrt(n_episodes)),
        "n_way": n_way,
        "k_shot": k_shot,
        "n_query": n_query,
        "n_episodes": n_episodes,
    }
