"""Input checks, run once at the public boundary of :mod:`tripletlab.functional`.

Every public function checks its arguments here and then calls unchecked internals; nothing below
the boundary checks again. Errors are :class:`~tripletlab.errors.InputError` /
:class:`~tripletlab.errors.InputTypeError` with messages that name the problem and the fix.
"""

from __future__ import annotations

import math

import torch

from ..errors import InputError, InputTypeError
from ..validation import check_embeddings, check_labels
from .mining import IndexTuple
from .reductions import REDUCTIONS
from .semihard import SEMIHARD_FALLBACKS
from .strategies import STRATEGIES


def check_options(
    strategy: str | None,
    margin: float,
    soft_margin: bool = False,
    reduction: str = "mean",
    semihard_fallback: str = "easiest",
) -> None:
    """Raise for an unknown strategy / reduction / fallback or a bad margin.

    ``strategy=None`` skips the strategy (losses on given triplets). The hinge needs
    ``margin >= 0``; the soft margin ignores it (any finite value).

    Example:
        >>> from tripletlab.functional import check_options
        >>> check_options("semihard", 0.2)
        >>> check_options("nope", 0.2)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        tripletlab.errors.InputError: unknown strategy 'nope'; choose one of ['all', ...]
    """
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; choose one of {list(STRATEGIES)}")
    if reduction not in REDUCTIONS:
        raise InputError(f"unknown reduction {reduction!r}; choose one of {list(REDUCTIONS)}")
    if semihard_fallback not in SEMIHARD_FALLBACKS:
        raise InputError(
            f"unknown semihard_fallback {semihard_fallback!r}; "
            f"choose one of {list(SEMIHARD_FALLBACKS)}"
        )
    if not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise InputError(f"margin must be a finite number, got {margin!r}")
    if not soft_margin and margin < 0:
        raise InputError(f"margin must be >= 0 for the hinge loss, got {margin}")


def check_inputs(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None = None,
    ref_labels: torch.Tensor | None = None,
) -> None:
    """Raise a clear :class:`~tripletlab.errors.InputError` for malformed embeddings or labels.

    Example:
        >>> import torch
        >>> from tripletlab.functional import check_inputs
        >>> check_inputs(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]))
        >>> check_inputs(torch.zeros(4, 2), torch.tensor([0, 0, 1]))
        Traceback (most recent call last):
        ...
        tripletlab.errors.InputError: labels has 3 entries but there are 4 embeddings
    """
    check_embeddings(embeddings, "embeddings")
    check_labels(labels, embeddings.shape[0], "labels")
    if (ref_embeddings is None) != (ref_labels is None):
        raise InputError("ref_embeddings and ref_labels must be given together")
    if ref_embeddings is not None:
        check_embeddings(ref_embeddings, "ref_embeddings")
        check_labels(ref_labels, ref_embeddings.shape[0], "ref_labels")
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise InputError(
                f"ref_embeddings have dimension {ref_embeddings.shape[1]} but embeddings have "
                f"{embeddings.shape[1]}"
            )


def check_distances(
    dist: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None
) -> None:
    """Raise unless ``dist`` is a (B, R) float matrix matching ``labels`` (B,) and the column
    labels (``ref_labels`` (R,), or ``labels`` when the batch is its own reference set)."""
    if not isinstance(dist, torch.Tensor):
        raise InputTypeError(f"dist must be a torch.Tensor, got {type(dist).__name__}")
    if dist.dim() != 2 or not dist.is_floating_point():
        raise InputError(
            f"dist must be a 2-D (B, R) floating-point matrix, got shape {tuple(dist.shape)} "
            f"and dtype {dist.dtype}"
        )
    check_labels(labels, dist.shape[0], "labels")
    if ref_labels is not None:
        check_labels(ref_labels, dist.shape[1], "ref_labels")
    elif dist.shape[1] != dist.shape[0]:
        raise InputError(
            f"dist is {tuple(dist.shape)} but no ref_labels were given: pass ref_labels for the "
            "columns, or a square (B, B) matrix of the batch against itself"
        )


def check_indices(indices_tuple: object, n_rows: int, n_cols: int) -> IndexTuple:
    """Check user-given ``(anchors, positives, negatives)`` and return them as long tensors."""
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) != 3:
        raise InputError("indices_tuple must be a tuple (anchors, positives, negatives)")
    out = []
    for name, t, bound in zip(
        ("anchors", "positives", "negatives"), indices_tuple, (n_rows, n_cols, n_cols), strict=True
    ):
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise InputError(f"indices_tuple {name} must be a 1-D tensor")
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputTypeError(f"indices_tuple {name} must be integer, got {t.dtype}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
            raise InputError(f"indices_tuple {name} out of range [0, {bound})")
        out.append(t.long())
    if not (out[0].shape == out[1].shape == out[2].shape):
        raise InputError("anchors, positives and negatives must have the same length")
    return out[0], out[1], out[2]
