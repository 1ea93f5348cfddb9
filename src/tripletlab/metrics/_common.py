"""Input conversion and checks shared by the metrics."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError, InputTypeError


def as_embeddings(x, what: str = "embeddings") -> torch.Tensor:
    """Convert to a 2-D float tensor (float64 stays float64, anything else becomes float32)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise InputTypeError(f"{what} must be a numpy array or torch tensor, got {type(x)}")
    x = x.detach().cpu()
    if x.dim() != 2:
        raise InputError(f"{what} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.float()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise InputError(f"{what} contain NaN or Inf values")
    return x


def as_labels(y, n: int, what: str = "labels") -> torch.Tensor:
    """Convert to a 1-D int64 tensor of length ``n`` (integer labels only, never float)."""
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


def check_distance(distance: str) -> str:
    if distance not in ("euclidean", "cosine"):
        raise InputError(f"unknown distance {distance!r}; choose 'euclidean' or 'cosine'")
    return distance


def block_distances(
    q: torch.Tensor, r: torch.Tensor, distance: str, r_sq: torch.Tensor | None = None
) -> torch.Tensor:
    """Distances between a block of queries and all references (euclidean or 1 - cos)."""
    if distance == "cosine":
        return 1.0 - q @ r.t()
    q_sq = (q * q).sum(1, keepdim=True)
    r_sq = (r * r).sum(1) if r_sq is None else r_sq
    return (q_sq + r_sq[None, :] - 2.0 * (q @ r.t())).clamp_min_(0.0).sqrt_()


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
