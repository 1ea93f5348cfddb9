"""``cnn``: a small convolutional network for images of any size, with optional test-time
augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import zoom
from ..errors import InputError
from .heads import EmbeddingHead
from .registry import register_model

__all__ = ["EmbeddingCNN"]


@register_model("cnn")
class EmbeddingCNN(nn.Module):
    """Small CNN for images of any size: (conv3x3-BN-ReLU, conv3x3-BN-ReLU, maxpool) blocks,
    global average pooling (or, with ``pool="flatten"``, the flattened feature map, which keeps
    the spatial layout of aligned inputs such as faces), then the embedding head.
    ``input_norm="per_image"`` standardises each image (brightness/contrast invariance).
    ``tta={"scales": [0.9, 1.0, 1.1], "hflip": true}`` averages the embeddings of zoomed and
    mirrored views in eval mode (test-time augmentation; training is unaffected), which makes
    the embedding robust to the scale of the subject at a cost of one forward pass per view.

    Example:
        >>> m = EmbeddingCNN(input_shape=[1, 28, 28], embedding_dim=32)
        >>> m(torch.rand(2, 1, 28, 28)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape,
        embedding_dim: int = 64,
        normalize: bool = True,
        channels=(32, 64, 128, 128),
        dropout: float = 0.0,
        pool: str = "avg",
        input_norm: str = "none",
        tta: dict | None = None,
    ) -> None:
        super().__init__()
        self.tta = _check_tta(tta)
        if pool not in ("avg", "flatten"):
            raise InputError(f"pool must be 'avg' or 'flatten', got {pool!r}")
        if input_norm not in ("none", "per_image"):
            raise InputError(f"input_norm must be 'none' or 'per_image', got {input_norm!r}")
        self.pool, self.input_norm = pool, input_norm
        if len(input_shape) != 3:
            raise InputError(f"the cnn model takes images (C, H, W), got {list(input_shape)}")
        layers: list[nn.Module] = []
        c_in = int(input_shape[0])
        h, w = int(input_shape[1]), int(input_shape[2])
        for c in channels:
            c = int(c)
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False),
                nn.BatchNorm2d(c),
                nn.ReLU(inplace=True),
            ]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c_in = c
        self.body = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        # "flatten" keeps the spatial layout (aligned inputs such as faces); "avg" is size-free
        features = c_in * h * w if pool == "flatten" else c_in
        self.head = EmbeddingHead(features, embedding_dim, normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.tta:
            return self._embed(x)
        views = [zoom(x, s) for s in self.tta["scales"]]
        if self.tta["hflip"]:
            views += [v.flip(3) for v in views]
        e = torch.stack([self._embed(v) for v in views]).mean(0)
        return F.normalize(e, dim=1) if self.head.normalize else e

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_norm == "per_image":  # remove brightness/contrast differences
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            std = x.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
            x = (x - mean) / std
        f = self.body(x)
        f = f.flatten(1) if self.pool == "flatten" else f.mean(dim=(2, 3))
        return self.head(self.dropout(f))


def _check_tta(tta: dict | None) -> dict | None:
    if tta is None:
        return None
    if not isinstance(tta, dict) or set(tta) - {"scales", "hflip"}:
        raise InputError(f"tta must be an object with 'scales' and/or 'hflip', got {tta!r}")
    scales = tta.get("scales", [1.0])
    hflip = tta.get("hflip", False)
    if (
        not isinstance(scales, (list, tuple))
        or not scales
        or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scales)
        or not all(0.25 <= s <= 4.0 for s in scales)
    ):
        raise InputError(
            f"tta scales must be a non-empty list of numbers in [0.25, 4], got {scales!r}"
        )
    if not isinstance(hflip, bool):
        raise InputError(f"tta hflip must be true or false, got {hflip!r}")
    return {"scales": [float(s) for s in scales], "hflip": hflip}
