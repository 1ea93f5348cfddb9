"""Input checks shared by the whole library: embedding matrices, labels, distance names, k.

Two flavours of the embedding and label checks exist on purpose: ``check_*`` functions validate
torch tensors in place (the training side: losses, miners, distances must not copy or convert
what the user passes, and float labels are an error), ``as_*`` functions accept numpy arrays or
tensors and convert them (the evaluation side: metrics, index, inference). Every message names
the argument and what to pass instead.

Example:
    >>> import numpy as np
    >>> from tripletlab.validation import as_embeddings, check_k
    >>> as_embeddings(np.eye(3, dtype=np.float32)).shape
    torch.Size([3, 3])
    >>> check_k(5)
    5
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import InputError, InputTypeError

__all__ = [
    "as_embeddings",
    "as_labels",
    "as_matrix",
    "check_distance",
    "check_embedding_pair",
    "check_embeddings",
    "check_k",
    "check_ks",
    "check_labels",
    "is_int",
]

EVAL_DISTANCES = ("euclidean", "cosine")  # the distances evaluation and search report in


def is_int(v: Any) -> bool:
    """True for Python/numpy integers (bools excluded)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_k(k: Any, name: str = "k", minimum: int = 1) -> int:
    """``k`` as an int if it is an integer >= ``minimum``, else :class:`InputError`."""
    if not is_int(k) or k < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise InputError(f"{name} must be {what}, got {k!r}")
    return int(k)


def check_ks(ks: Any) -> list[int]:
    """A sorted list of distinct positive ints from an int or a sequence of them."""
    if is_int(ks):
        ks = (ks,)
    try:
        ks = list(ks)
    except TypeError:
        raise InputError(f"ks must be a sequence of positive integers, got {ks!r}") from None
    if not ks or not all(is_int(k) and k >= 1 for k in ks):
        raise InputError(f"ks must be positive integers, got {ks!r}")
    return sorted({int(k) for k in ks})


def check_distance(distance: str, allowed: Iterable[str] = EVAL_DISTANCES) -> str:
    """``distance`` if it is one of ``allowed`` (default: the evaluation distances)."""
    allowed = list(allowed)
    if distance not in allowed:
        choices = " or ".join(map(repr, allowed)) if len(allowed) <= 2 else f"one of {allowed}"
        raise InputError(f"unknown distance {distance!r}; choose {choices}")
    return distance


# ------------------------------------------------------------------ tensors, checked in place


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite. A NaN or Inf anywhere makes the sum NaN or Inf, and one
    sum costs ~8x less than ``isfinite(t).all()`` on CPU (per-call cost of a loss at small B);
    a non-finite sum of finite values (overflow) is rechecked element-wise."""
    return math.isfinite(float(t.detach().sum())) or bool(torch.isfinite(t).all())


def check_embeddings(emb: Any, what: str = "embeddings", finite: bool = True) -> None:
    """A 2-D floating-point torch tensor (B, D), finite unless ``finite=False``."""
    if not isinstance(emb, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(emb).__name__}")
    if emb.dim() != 2:
        raise InputError(f"{what} must be 2-D (B, D), got shape {tuple(emb.shape)}")
    if not emb.is_floating_point():
        raise InputTypeError(f"{what} must be a floating-point tensor, got dtype {emb.dtype}")
    if finite and emb.numel() > 0 and not _all_finite(emb):
        bad = int((~torch.isfinite(emb)).any(dim=1).sum())
        raise InputError(f"{what} contain NaN or Inf values (in {bad} of {emb.shape[0]} rows)")


def check_embedding_pair(x: Any, y: Any | None) -> None:
    """``x`` (B, D) and optionally ``y`` (R, D): float tensors of one dtype and dimension."""
    check_embeddings(x, "embeddings", finite=False)
    if y is None:
        return
    if not isinstance(y, torch.Tensor):
        raise InputTypeError(f"reference embeddings must be a torch.Tensor, got {type(y)}")
    if y.dim() != 2:
        raise InputError(f"reference embeddings must be 2-D (R, D), got {tuple(y.shape)}")
    if y.shape[1] != x.shape[1]:
        raise InputError(
            f"embedding dimensions differ: embeddings have D={x.shape[1]}, "
            f"reference embeddings have D={y.shape[1]}"
        )
    if y.dtype != x.dtype:
        raise InputTypeError(f"dtype mismatch: embeddings {x.dtype}, reference {y.dtype}")


def check_labels(labels: Any, n: int, what: str = "labels") -> None:
    """A 1-D integer torch tensor of length ``n`` (float labels are refused, not cast)."""
    if not isinstance(labels, torch.Tensor):
        raise InputTypeError(f"{what} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1:
        raise InputError(f"{what} must be 1-D (B,), got shape {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise InputTypeError(
            f"{what} must be an integer tensor, got dtype {labels.dtype} "
            "(float labels can silently merge classes; convert with labels.long())"
        )
    if labels.shape[0] != n:
        raise InputError(f"{what} has {labels.shape[0]} entries but there are {n} embeddings")


# ------------------------------------------------------------ arrays or tensors, converted


def as_embeddings(x: Any, what: str = "embeddings") -> torch.Tensor:
    """A 2-D finite float CPU tensor (float64 stays float64, anything else becomes float32)
    from a numpy array or tensor."""
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise InputError(f"{what} must be numeric, got dtype {x.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{what} must be a numpy array or torch tensor, got {type(x)}")
    x = x.detach().cpu()
    if x.dim() != 2:
        raise InputError(f"{what} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contain NaN or Inf values")
    return x


def as_matrix(x: Any, dim: int | None, what: str = "embeddings") -> np.ndarray:
    """A C-contiguous float32 numpy matrix (n, dim); a single vector of length ``dim`` becomes
    one row. Used where vectors go to faiss or to disk."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 1 and dim is not None and a.shape[0] == dim:
        a = a[None]
    if a.ndim != 2:
        raise InputError(f"{what} must be 2-D (n, dim), got shape {a.shape}")
    if dim is not None and a.shape[1] != dim:
        raise InputError(f"{what} have dimension {a.shape[1]} but the index has dimension {dim}")
    if a.dtype.kind not in "fiu":
        raise InputError(f"{what} must be numeric, got dtype {a.dtype}")
    return as_embeddings(np.ascontiguousarray(a, dtype=np.float32), what).numpy()


def as_labels(y: Any, n: int, what: str = "labels") -> torch.Tensor:
    """A 1-D int64 CPU tensor of length ``n`` from integers (never from floats)."""
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    if isinstance(y, np.ndarray):
        if y.dtype.kind not in "iu":
            raise InputTypeError(f"{what} must be integers, got dtype {y.dtype}")
        y = torch.from_numpy(y.astype(np.int64))
    if not isinstance(y, torch.Tensor):
        raise InputTypeError(f"{what} must be a numpy array or torch tensor, got {type(y)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InputTypeError(f"{what} must be integers, got dtype {y.dtype}")
    y = y.detach().cpu().long()
    if y.dim() != 1:
        raise InputError(f"{what} must be 1-D, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise InputError(f"{what} has {y.shape[0]} entries but there are {n} embeddings")
    return y
