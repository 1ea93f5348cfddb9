"""Embedding networks with an L2-normalised head, a name -> factory registry, and augmentation.

``build_model(config)`` rebuilds a model from the dict saved in a run's ``config.json``; only
names in :data:`MODELS` are accepted, so a config file can never import arbitrary code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError, InputTypeError
from .augment import Augment, build_augment, zoom
from .backbones import BACKBONES, BackboneEmbedding

__all__ = [
    "MODELS",
    "MODEL_DEFAULTS",
    "Augment",
    "BACKBONES",
    "BackboneEmbedding",
    "EmbeddingCNN",
    "EmbeddingMLP",
    "build_augment",
    "build_model",
]


class EmbeddingHead(nn.Module):
    """Linear projection to ``embedding_dim``, L2-normalised when ``normalize``."""

    def __init__(self, in_features: int, embedding_dim: int, normalize: bool = True) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, embedding_dim)
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.proj(x)
        return F.normalize(e, dim=1) if self.normalize else e


class EmbeddingMLP(nn.Module):
    """MLP for vectors: (Linear-BN-ReLU) blocks then the embedding head.

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
    ) -> None:
        super().__init__()
        if len(input_shape) != 1:
            raise InputError(f"the mlp model takes vectors, got input shape {list(input_shape)}")
        layers: list[nn.Module] = []
        width = int(input_shape[0])
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.BatchNorm1d(int(h)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        self.body = nn.Sequential(*layers)
        self.head = EmbeddingHead(width, embedding_dim, normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


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


MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": EmbeddingMLP,
    "cnn": EmbeddingCNN,
    "backbone": BackboneEmbedding,
}
"""Registry name -> factory (keyword arguments: ``input_shape``, ``embedding_dim``, ``normalize``
and the model's own keys). Use :func:`build_model` to get a model with its ``config``."""

MODEL_DEFAULTS: dict[str, dict] = {
    "mlp": {"hidden": [256, 256], "dropout": 0.0},
    "cnn": {
        "channels": [32, 64, 128, 128],
        "dropout": 0.0,
        "pool": "avg",
        "input_norm": "none",
        "tta": None,
    },
    # weights are not part of a model config: a run's own weights live in model.safetensors
    # (the trainer loads ImageNet / --weights FILE once, before training)
    "backbone": {
        "backbone": "mobilenet_v2",
        "pool": "avg",
        "neck": False,
        "dropout": 0.0,
        "freeze_bn": True,
        "freeze_stages": 0,
    },
}
"""The model-specific config keys of each registered model and their defaults."""
_COMMON = {"embedding_dim": 64, "normalize": True}


def build_model(config: dict) -> nn.Module:
    """Build a model from its config dict; ``model.config`` holds the full resolved config.

    Keys: ``name`` (see :data:`MODELS`), ``input_shape``, ``embedding_dim`` (64), ``normalize``
    (True), and the model's own keys (:data:`MODEL_DEFAULTS`; mlp: ``hidden``, ``dropout``;
    cnn: ``channels``, ``dropout``, ``pool``, ``input_norm``, ``tta``). Unknown names or keys
    raise :class:`~tripletlab.errors.InputError`; nothing outside :data:`MODELS` is ever built.

    Example:
        >>> m = build_model({"name": "mlp", "input_shape": [64], "embedding_dim": 16})
        >>> m.config["hidden"], m(torch.rand(2, 64)).shape
        ([256, 256], torch.Size([2, 16]))
    """
    if not isinstance(config, dict):
        raise InputTypeError(f"model config must be a dict, got {type(config).__name__}")
    name = config.get("name")
    if name not in MODELS:
        raise InputError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    factory, defaults = MODELS[name], MODEL_DEFAULTS[name]
    allowed = {"name", "input_shape", *defaults, *_COMMON}
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise InputError(f"unknown keys for model {name!r}: {unknown}")
    if "input_shape" not in config:
        raise InputError("model config needs 'input_shape'")
    full = {"name": name, **_COMMON, **defaults, **config}
    shape = full["input_shape"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise InputError(f"input_shape must be a list of positive ints, got {shape!r}")
    dim = full["embedding_dim"]
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise InputError(f"embedding_dim must be a positive int, got {dim!r}")
    if not isinstance(full["normalize"], bool):
        raise InputError(f"normalize must be true or false, got {full['normalize']!r}")
    for key in ("hidden", "channels"):
        if key in full and not _positive_ints(full[key], allow_empty=key == "hidden"):
            raise InputError(f"{key} must be a list of positive ints, got {full[key]!r}")
    drop = full.get("dropout", 0.0)
    if not isinstance(drop, (int, float)) or isinstance(drop, bool) or not 0.0 <= drop < 1.0:
        raise InputError(f"dropout must be a number in [0, 1), got {drop!r}")
    kwargs = {k: v for k, v in full.items() if k != "name"}
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise InputError(f"invalid model config for {name!r}: {e}") from None
    model.config = {
        **full,
        "input_shape": list(shape),
        **{k: list(full[k]) for k in ("hidden", "channels") if k in full},
    }
    return model


def _positive_ints(v, allow_empty: bool) -> bool:
    return (
        isinstance(v, (list, tuple))
        and (allow_empty or len(v) > 0)
        and all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in v)
    )


def default_model_config(input_shape, embedding_dim: int = 64) -> dict:
    """The default model for a data set: a CNN for images, an MLP for vectors."""
    name = "cnn" if len(input_shape) == 3 else "mlp"
    return {"name": name, "input_shape": list(input_shape), "embedding_dim": embedding_dim}
