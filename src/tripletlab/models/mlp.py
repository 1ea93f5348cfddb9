"""``mlp``: a multi-layer perceptron for vector data."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from .heads import EmbeddingHead
from .registry import register_model

__all__ = ["EmbeddingMLP"]


@register_model("mlp")
class EmbeddingMLP(nn.Module):
    """MLP for vectors: (Linear-BN-ReLU) blocks then the embedding head. ``batchnorm=False``
    drops the BatchNorm layers (Linear-ReLU blocks), e.g. for gradient caching
    (``--chunk-size``), where BatchNorm would see chunk statistics.

    Example:
        >>> m = EmbeddingMLP(input_shape=[64], embedding_dim=16)
        >>> m(torch.randn(4, 64)).shape
        torch.Size([4, 16])
    """

    def __init__(
        self,
        input_shape,
        embedding_dim: int = 64,
        normalize: bool = True,
        hidden=(256, 256),
        dropout: float = 0.0,
        batchnorm: bool = True,
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise InputError(f"the mlp model takes vectors, got input shape {list(input_shape)}")
        layers: list[nn.Module] = []
        width = int(input_shape[0])
        for h in hidden:
            layers.append(nn.Linear(width, int(h)))
            if batchnorm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = EmbeddingHead(width, embedding_dim, normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))
