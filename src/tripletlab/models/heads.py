"""The embedding head shared by every model: a linear projection, L2-normalised by default."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EmbeddingHead"]


class EmbeddingHead(nn.Module):
    """Linear projection to ``embedding_dim``, L2-normalised when ``normalize``."""

    def __init__(self, in_features: int, embedding_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embedding_dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.proj(x)
        return F.normalize(e, dim=1) if self.normalize else e
