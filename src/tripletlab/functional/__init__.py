"""Triplet losses and online triplet mining as pure functions on tensors.

Definitions (``DESIGN.md`` §2). Embeddings ``E`` (B, D), integer labels ``y`` (B,), a distance
matrix ``dist`` (B, R) between the anchors (rows) and a reference set (columns; by default the batch
itself). A positive pair is (a, p) with a != p and y_a == y_p; a negative n has y_n != y_a.

* hinge loss of a triplet:       ``l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)``
* soft-margin loss of a triplet: ``l(a, p, n) = softplus(d(a, p) - d(a, n))`` (Hermans et al. 2017)

Negatives relative to a positive pair (a, p) (Schroff et al. 2015):

* hard:      ``d(a, n) <  d(a, p)``
* semi-hard: ``d(a, p) <  d(a, n) < d(a, p) + margin``
* easy:      ``d(a, n) >= d(a, p) + margin``

Strategies (:data:`STRATEGIES`, the keys of :data:`STRATEGY_TABLE`):

* ``all`` — batch-all: every valid triplet (FaceNet-style; averaged over active triplets by
  default). Exact in O(B²) memory: :mod:`~tripletlab.functional.batch_all`.
* ``hard`` — batch-hard (Hermans, Beyer & Leibe 2017, "In Defense of the Triplet Loss"): per anchor,
  its farthest positive and its closest negative.
* ``semihard`` — FaceNet (Schroff, Kalenichenko & Philbin 2015): per positive pair, the closest
  negative with ``d(a, n) > d(a, p)``. When no such negative exists, ``semihard_fallback`` decides:
  ``"easiest"`` takes the farthest negative (TF-Addons' ``triplet_semihard_loss``), ``"drop"`` drops
  the pair (:mod:`~tripletlab.functional.semihard`).
* ``hardest-negative`` — per positive pair, the closest negative.
* ``easy-positive`` — (Xuan, Stylianou, Liu & Pless 2020, "Improved Embeddings with Easy Positive
  Triplet Mining"): per anchor, its closest positive with its closest (hardest) negative.
* ``distance-weighted`` — (Wu, Manmatha, Smola & Krähenbühl 2017, "Sampling Matters in Deep
  Embedding Learning"): per positive pair, one negative sampled with probability proportional to
  ``q(d)^-1`` (:func:`distance_weighted_probabilities`).
* ``random`` — per positive pair, one negative drawn uniformly.

Reductions (:data:`REDUCTIONS`): ``mean`` over mined triplets, ``mean_active`` over triplets with
loss > 0, ``sum``. With no triplet (or no active one) the loss is 0 and still backpropagates
(zero gradients); the returned stats say why.

Layout: ``checks`` (input checks, run once at the public boundary), ``stats``, ``slots`` (row
chunks and the one label-slot builder), ``reductions``, ``batch_all`` (the exact batch-all
autograd functions), ``mining`` / ``semihard`` / ``mine_all`` (one ``_mine_<strategy>`` each),
``dense`` (the small-batch miners), ``strategies`` (the name -> strategy table), ``triplets``
(losses on given triplets), ``online`` (the public entry points).

Example:
    >>> import torch
    >>> from tripletlab.functional import STRATEGIES, triplet_loss
    >>> STRATEGIES[:3]
    ('all', 'hard', 'semihard')
    >>> emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    >>> loss, stats = triplet_loss(emb, torch.arange(4).repeat_interleave(2), strategy="all")
    >>> stats.as_dict()["n_triplets"]  # 8 positive pairs x 6 negatives
    48
"""

from __future__ import annotations

# Tuning knobs, defined before the submodules are imported: they read them from here at call
# time, so a test can patch ``tripletlab.functional._CHUNK_ELEMS`` and reach every path.
# Elements per temporary (rows x columns) while processing a distance matrix in row chunks.
_CHUNK_ELEMS = 1 << 22
# Up to this many positives per anchor, batch-all counts and semi-hard searches use one vectorised
# comparison per positive; beyond it, ``searchsorted`` on sorted values.
_DIRECT_SLOTS = 24
# The 'all' miner warns before materialising more index triplets than this.
_LARGE_TRIPLET_COUNT = 1 << 24
# Up to this many matrix elements (B x R), the deterministic miners take the dense small-batch
# path (``dense``: whole-matrix masks, a few kernels per call); 0 forces the chunked path.
_SMALL_ELEMS = 1 << 16

from .batch_all import batch_all_triplet_loss  # noqa: E402
from .checks import check_inputs, check_options  # noqa: E402
from .mining import IndexTuple, distance_weighted_probabilities  # noqa: E402
from .online import (  # noqa: E402
    batch_hard_triplet_loss,
    mine_from_distances,
    mine_triplets,
    triplet_loss,
    triplet_loss_from_distances,
)
from .reductions import REDUCTIONS, reduce_triplet_losses  # noqa: E402
from .semihard import SEMIHARD_FALLBACKS  # noqa: E402
from .stats import TripletStats  # noqa: E402
from .strategies import STRATEGIES, STRATEGY_TABLE, Strategy, default_reduction  # noqa: E402
from .triplets import triplet_loss_on_indices, triplet_margin_loss  # noqa: E402

# the name losses.py and miners.py used before the package existed
_check_options = check_options

__all__ = [
    "REDUCTIONS",
    "SEMIHARD_FALLBACKS",
    "STRATEGIES",
    "STRATEGY_TABLE",
    "IndexTuple",
    "Strategy",
    "TripletStats",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "check_inputs",
    "check_options",
    "default_reduction",
    "distance_weighted_probabilities",
    "mine_from_distances",
    "mine_triplets",
    "reduce_triplet_losses",
    "triplet_loss",
    "triplet_loss_from_distances",
    "triplet_loss_on_indices",
    "triplet_margin_loss",
]
