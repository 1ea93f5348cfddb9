"""tripletlab's triplet loss as a sentence-transformers loss (the optional extra ``[text]``).

:class:`TripletLoss` goes where ``losses.BatchSemiHardTripletLoss`` / ``BatchHardTripletLoss`` /
``BatchAllTripletLoss`` / ``BatchHardSoftMarginTripletLoss`` go in a
``SentenceTransformerTrainer``: same constructor shape (``model`` first, then ``margin`` and the
distance), same input (a dataset with one text column and a ``label`` column), so switching is one
line::

    # loss = losses.BatchSemiHardTripletLoss(model)
    loss = TripletLoss(model, strategy="semihard", margin=0.2)

:class:`CachedTripletLoss` is the same loss with gradient caching (Gao et al. 2021; their
``CachedMultipleNegativesRankingLoss`` does it for in-batch softmax): the batch is embedded
``mini_batch_size`` texts at a time, so a mined batch of thousands of texts fits, with the
same loss and gradients::

    loss = CachedTripletLoss(model, strategy="semihard", mini_batch_size=32)

and :func:`log_triplet_stats` adds the loss's mining statistics (active fraction, mean d(a,p),
d(a,n), collapse signal) to the trainer's logs. docs/text.md puts both examples side by side.

Importing this module does not import sentence-transformers; the loss only needs the model to
return ``{"sentence_embedding": ...}`` as a ``SentenceTransformer`` does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, InputTypeError
from ..losses.gradient_cache import (
    backward_in_chunks,
    check_chunk_size,
    embed_in_chunks,
    embedding_gradient,
)
from ..losses.triplet import TripletLoss as _CoreTripletLoss

__all__ = [
    "STATS_KEYS",
    "CachedTripletLoss",
    "TripletLoss",
    "TripletStatsCallback",
    "log_triplet_stats",
]

#: The statistics :func:`log_triplet_stats` adds to the logs (as ``triplet/<key>``), averaged
#: over the steps since the last log line.
STATS_KEYS = ("active_fraction", "mean_d_ap", "mean_d_an", "mean_distance", "n_triplets")

# sentence-transformers' distance functions (BatchHardTripletLossDistanceFunction) by __name__
_THEIR_DISTANCES = {
    "euclidean_distance": "euclidean",
    "eucledian_distance": "euclidean",
    "cosine_distance": "cosine",
}


def _distance_name(distance: str | Callable | None, distance_metric: Callable | None) -> str:
    if distance is not None and distance_metric is not None:
        raise InputError("give either distance (a name) or distance_metric (their function)")
    chosen = distance_metric if distance_metric is not None else distance
    if chosen is None:
        return "euclidean"
    if isinstance(chosen, str):
        return chosen
    name = getattr(chosen, "__name__", "")
    if name in _THEIR_DISTANCES:
        return _THEIR_DISTANCES[name]
    raise InputError(
        f"unsupported distance function {chosen!r}: pass distance='euclidean', 'sqeuclidean' or "
        "'cosine', or BatchHardTripletLossDistanceFunction.euclidean_distance / cosine_distance"
    )


class TripletLoss(nn.Module):
    """Batch triplet loss with tripletlab's exact online mining, for ``SentenceTransformerTrainer``.

    For the positive pairs (a, p) of the batch (``a != p``, same label) and the mined negatives n
    (different label)::

        l(a, p, n) = max(0, d(a, p) - d(a, n) + margin)      (hinge)
        l(a, p, n) = softplus(d(a, p) - d(a, n))             (soft_margin=True)

    Negatives are *hard* if ``d(a,n) < d(a,p)``, *semi-hard* if
    ``d(a,p) < d(a,n) < d(a,p) + margin`` and *easy* otherwise. ``strategy`` picks them:
    ``semihard`` (FaceNet, Schroff et al. 2015: per positive pair the closest negative farther
    than the positive; with ``semihard_fallback="easiest"`` the farthest negative when there is
    none, as TF-Addons and sentence-transformers do, or ``"drop"``), ``hard`` (batch-hard, Hermans
    et al. 2017), ``all`` (batch-all), ``hardest-negative``, ``easy-positive``,
    ``distance-weighted``, ``random`` (see :mod:`tripletlab.functional`). Batch-all and semi-hard
    are exact in O(B²) memory. Reductions: ``mean`` over mined triplets, ``mean_active`` over
    triplets with loss > 0 (the default for ``all``), ``sum``.

    Requirements: one text column and an integer ``label`` column; at least 2 examples per label
    in a batch for any positive pair (use ``batch_sampler=BatchSamplers.GROUP_BY_LABEL``).

    Relations to sentence-transformers (same inputs):

    ====================================  =================================================
    theirs                                this class
    ====================================  =================================================
    ``BatchSemiHardTripletLoss(model)``   ``TripletLoss(model, strategy="semihard")``
    ``BatchHardTripletLoss(model)``       ``TripletLoss(model, strategy="hard")``
    ``BatchAllTripletLoss(model)``        ``TripletLoss(model, strategy="all")``
    ``BatchHardSoftMarginTripletLoss``    ``TripletLoss(model, strategy="hard",
                                          soft_margin=True)``
    ====================================  =================================================

    Their margin default is 5 (on unit vectors, whose distances are at most 2, every triplet is
    active); ours is 0.2. With the same margin and distance, ``semihard`` equals their
    semi-hard value and gradient, ``all`` their batch-all, and ``hard`` their batch-hard on batches
    where every anchor has a positive (docs/text.md).

    After each call :attr:`stats` holds the mining statistics of the batch; the running sums since
    the last :meth:`pop_stats` feed :class:`TripletStatsCallback`.

    Args:
        model: the ``SentenceTransformer`` (anything returning ``{"sentence_embedding": E}``).
        margin: hinge margin (>= 0).
        strategy: a tripletlab strategy name (default ``semihard``).
        distance: ``euclidean``, ``sqeuclidean`` or ``cosine`` (or one of their distance
            functions, ``BatchHardTripletLossDistanceFunction.euclidean_distance`` /
            ``cosine_distance``).
        distance_metric: their keyword, accepted for a verbatim swap (same as ``distance``).
        reduction: ``mean``, ``mean_active``, ``sum`` (None: ``mean_active`` for ``all``,
            else ``mean``).
        soft_margin: ``softplus(d_ap - d_an)`` instead of the hinge.
        semihard_fallback: ``easiest`` or ``drop`` (see above).
        seed: seeds the ``random`` / ``distance-weighted`` strategies.

    Example:
        >>> from sentence_transformers import SentenceTransformer  # doctest: +SKIP
        >>> model = SentenceTransformer("path/to/model")  # doctest: +SKIP
        >>> loss = TripletLoss(model, strategy="semihard", margin=0.2)  # doctest: +SKIP
        >>> trainer = SentenceTransformerTrainer(model=model, args=args,
        ...     train_dataset=train_dataset, loss=loss)  # doctest: +SKIP
        >>> log_triplet_stats(trainer)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        margin: float = 0.2,
        strategy: str = "semihard",
        distance: str | Callable | None = None,
        *,
        distance_metric: Callable | None = None,
        reduction: str | None = None,
        soft_margin: bool = False,
        semihard_fallback: str = "easiest",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model  # the attribute name the trainer looks for when it wraps the model
        self.triplet = _CoreTripletLoss(
            margin=margin,
            strategy=strategy,
            distance=_distance_name(distance, distance_metric),
            reduction=reduction,
            soft_margin=soft_margin,
            semihard_fallback=semihard_fallback,
            seed=seed,
        )
        self._sums: dict[str, float] = {}
        self._calls = 0

    @property
    def margin(self) -> float:
        return self.triplet.margin

    @property
    def strategy(self) -> str:
        return self.triplet.strategy

    @property
    def distance(self) -> str:
        return self.triplet.distance

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        """Embed the first (only) text column and return the triplet loss of the batch."""
        features = list(sentence_features)
        if len(features) != 1:
            raise InputError(
                f"TripletLoss takes one text column and a 'label' column, got {len(features)} text "
                "columns (for (anchor, positive, negative) columns use "
                "sentence-transformers' TripletLoss)"
            )
        emb = self.model(features[0])["sentence_embedding"]
        return self.compute_loss_from_embeddings([emb], labels)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        """The loss of precomputed embeddings (the hook of sentence-transformers' cached losses)."""
        emb = embeddings[0]
        if labels is None:
            raise InputError("TripletLoss needs a 'label' column in the training dataset")
        labels = torch.as_tensor(labels, device=emb.device).reshape(-1)
        if labels.numel() != emb.shape[0]:
            raise InputError(f"{emb.shape[0]} embeddings but {labels.numel()} labels")
        if labels.is_floating_point():
            if not torch.equal(labels, labels.round()):
                raise InputTypeError(
                    "labels must be integer class ids, got non-integer floats; map each class "
                    "to an int (e.g. dataset.class_encode_column('label'))"
                )
            labels = labels.long()
        if emb.dtype in (torch.float16, torch.bfloat16):
            emb = emb.float()  # distances in float32, as their losses do
        loss = self.triplet(emb, labels)
        self._accumulate(self.triplet.stats)
        return loss

    @property
    def stats(self) -> dict[str, float | int | str]:
        """Mining statistics of the last batch (see :class:`tripletlab.TripletLoss`)."""
        return self.triplet.stats

    def _accumulate(self, stats: Mapping[str, Any]) -> None:
        for key in STATS_KEYS:
            self._sums[key] = self._sums.get(key, 0.0) + float(stats.get(key, 0.0))
        self._calls += 1

    def pop_stats(self) -> dict[str, float]:
        """Mean of each of :data:`STATS_KEYS` over the calls since the last pop (then reset)."""
        if not self._calls:
            return {}
        out = {key: value / self._calls for key, value in self._sums.items()}
        self._sums, self._calls = {}, 0
        return out

    def get_config_dict(self) -> dict[str, Any]:
        """What sentence-transformers writes into the model card."""
        return {
            "strategy": self.triplet.strategy,
            "margin": self.triplet.margin,
            "distance": self.triplet.distance,
            "reduction": self.triplet.reduction,
            "soft_margin": self.triplet.soft_margin,
            "semihard_fallback": self.triplet.semihard_fallback,
        }

    @property
    def citation(self) -> str:
        return """
@inproceedings{schroff2015facenet,
    title={FaceNet: A Unified Embedding for Face Recognition and Clustering},
    author={Florian Schroff and Dmitry Kalenichenko and James Philbin},
    booktitle={CVPR},
    year={2015}
}
"""


class CachedTripletLoss(TripletLoss):
    """:class:`TripletLoss` with gradient caching: the mined loss of a batch larger than memory.

    Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
    Limited Setup". ``forward`` embeds the batch ``mini_batch_size`` texts at a time without a
    graph, computes the loss ``L(E, y)`` of the whole batch (exact online mining over all of it)
    and ``G = dL/dE``, and returns ``L`` with a hook: when the trainer calls ``backward``, each
    mini-batch is embedded again with a graph, its random state replayed (dropout draws the same
    masks), and ``G_c`` scaled by the incoming gradient (fp16 loss scaling, gradient
    accumulation) is backpropagated, so ``dL/dθ = Σ_c (dE_c/dθ)ᵀ G_c``: the gradient of the
    uncached loss, with the activations of one mini-batch alive at a time (one extra forward).
    Under DDP the gradients are synchronised on the last mini-batch only. A model with BatchNorm
    in training mode sees mini-batch statistics (a warning says so); transformers have none.

    Swap it in for :class:`TripletLoss` (or for sentence-transformers' batch triplet losses) in a
    ``SentenceTransformerTrainer``; ``per_device_train_batch_size`` can then exceed what fits in
    memory. Same arguments as :class:`TripletLoss` plus ``mini_batch_size`` (texts per forward
    with a graph; memory, not the result, depends on it).

    Example:
        >>> loss = CachedTripletLoss(model, mini_batch_size=32)  # doctest: +SKIP
        >>> trainer = SentenceTransformerTrainer(model=model, args=args,
        ...     train_dataset=train_dataset, loss=loss)  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """

    def __init__(
        self,
        model: nn.Module,
        margin: float = 0.2,
        strategy: str = "semihard",
        distance: str | Callable | None = None,
        *,
        mini_batch_size: int = 32,
        distance_metric: Callable | None = None,
        reduction: str | None = None,
        soft_margin: bool = False,
        semihard_fallback: str = "easiest",
        seed: int | None = None,
    ) -> None:
        super().__init__(
            model,
            margin,
            strategy,
            distance,
            distance_metric=distance_metric,
            reduction=reduction,
            soft_margin=soft_margin,
            semihard_fallback=semihard_fallback,
            seed=seed,
        )
        self.mini_batch_size = check_chunk_size(mini_batch_size)

    def _embed(self, features: dict[str, Tensor]) -> Tensor:
        return self.model(features)["sentence_embedding"]

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        """The loss of the whole batch; its ``backward`` runs the cached re-forward."""
        features = list(sentence_features)
        if len(features) != 1:
            raise InputError(
                f"CachedTripletLoss takes one text column and a 'label' column, got "
                f"{len(features)} text columns"
            )
        inputs = dict(features[0])
        emb, record = embed_in_chunks(self._embed, inputs, self.mini_batch_size, module=self.model)
        if not torch.is_grad_enabled():  # evaluation: no backward to prepare
            return self.compute_loss_from_embeddings([emb], labels)
        emb = emb.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self.compute_loss_from_embeddings([emb], labels)
            grad = embedding_gradient(loss, emb)
        loss = loss.detach().requires_grad_(True)

        def replay(grad_output: Tensor) -> None:
            backward_in_chunks(self._embed, inputs, grad * grad_output.to(grad.dtype), record)

        loss.register_hook(replay)
        return loss

    def get_config_dict(self) -> dict[str, Any]:
        return {**super().get_config_dict(), "mini_batch_size": self.mini_batch_size}

    @property
    def citation(self) -> str:
        return (
            super().citation
            + """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv}
}
"""
        )


def _find_losses(loss: Any) -> list[TripletLoss]:
    if isinstance(loss, TripletLoss):
        return [loss]
    if isinstance(loss, Mapping):  # one loss per dataset
        return [v for v in loss.values() if isinstance(v, TripletLoss)]
    if isinstance(loss, nn.Module):  # e.g. wrapped in MatryoshkaLoss
        return [m for m in loss.modules() if isinstance(m, TripletLoss)]
    return []


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers comes with sentence-transformers
        return object
    return TrainerCallback


class TripletStatsCallback(_callback_base()):  # type: ignore[misc]
    """A ``transformers.TrainerCallback`` that adds ``triplet/<stat>`` to each training log line.

    The values are means over the steps since the previous log line (``logging_steps``), so they
    line up with the logged ``loss``. Install it with :func:`log_triplet_stats`, which puts it
    first so the progress bar, TensorBoard and ``trainer.state.log_history`` all see the values.
    """

    def __init__(self, losses: Iterable[TripletLoss]) -> None:
        self.losses = list(losses)

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102
        if logs is None or "loss" not in logs:
            return control
        for i, loss in enumerate(self.losses):
            prefix = "triplet/" if len(self.losses) == 1 else f"triplet{i}/"
            added = {prefix + k: round(v, 6) for k, v in loss.pop_stats().items()}
            logs.update(added)
            if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
                state.log_history[-1].update(added)
        return control


def log_triplet_stats(trainer: Any) -> TripletStatsCallback:
    """Log the mining statistics of every tripletlab :class:`TripletLoss` of ``trainer``.

    Returns the installed callback. Raises :class:`~tripletlab.errors.InputError` when the
    trainer's loss contains no tripletlab loss.

    Example:
        >>> trainer = SentenceTransformerTrainer(model=model, train_dataset=ds,
        ...                                      loss=TripletLoss(model))  # doctest: +SKIP
        >>> log_triplet_stats(trainer)  # doctest: +SKIP
        >>> trainer.train()  # logs: {'loss': ..., 'triplet/active_fraction': ...}  # doctest: +SKIP
    """
    losses = _find_losses(getattr(trainer, "loss", None))
    if not losses:
        raise InputError("the trainer's loss is not (and contains no) tripletlab TripletLoss")
    callback = TripletStatsCallback(losses)
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
