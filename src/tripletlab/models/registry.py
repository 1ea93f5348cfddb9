"""The model registry: ``name -> model class``, filled by :func:`register_model`.

``build_model(config)`` rebuilds a model from the dict saved in a run's ``config.json``; only
registered names are accepted, so a config file can never import arbitrary code. A model is a
``torch.nn.Module`` whose ``__init__`` takes ``input_shape``, ``embedding_dim`` and ``normalize``
plus its own keyword arguments; those and their defaults (from the signature) are the model's
config keys (:data:`MODEL_DEFAULTS`). Add one in a new module:

Example:
    >>> import torch
    >>> from torch import nn
    >>> from tripletlab.models import MODEL_DEFAULTS, MODELS, build_model, register_model
    >>> @register_model("doc-linear")
    ... class Linear(nn.Module):
    ...     def __init__(self, input_shape, embedding_dim=64, normalize=True, bias=True):
    ...         super().__init__()
    ...         self.lin = nn.Linear(input_shape[0], embedding_dim, bias=bias)
    ...     def forward(self, x):
    ...         return self.lin(x)
    >>> build_model({"name": "doc-linear", "input_shape": [4]}).config["bias"]
    True
    >>> del MODELS["doc-linear"], MODEL_DEFAULTS["doc-linear"]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

from torch import nn

from ..errors import InputError, InputTypeError

__all__ = ["MODELS", "MODEL_DEFAULTS", "build_model", "default_model_config", "register_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {}
"""Registry name -> model class (keyword arguments: ``input_shape``, ``embedding_dim``,
``normalize`` and the model's own keys). Use :func:`build_model` to get a model with its
``config``."""

MODEL_DEFAULTS: dict[str, dict] = {}
"""The model-specific config keys of each registered model and their defaults."""

_COMMON = {"embedding_dim": 64, "normalize": True}
_M = TypeVar("_M")


def _signature_defaults(cls) -> dict:
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in ("self", "input_shape", *_COMMON) or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise TypeError(f"model option {name!r} of {cls.__name__} needs a default")
        out[name] = list(p.default) if isinstance(p.default, tuple) else p.default
    return out


def register_model(name: str, defaults: dict | None = None) -> Callable[[_M], _M]:
    """Class decorator: register a model under ``name`` (timm's ``@register_model``). Its own
    config keys and defaults come from ``__init__``'s signature unless ``defaults`` is given."""

    def deco(cls: _M) -> _M:
        if name in MODELS and MODELS[name] is not cls:
            raise ValueError(f"a model named {name!r} is already registered")
        MODELS[name] = cls
        MODEL_DEFAULTS[name] = dict(_signature_defaults(cls) if defaults is None else defaults)
        return cls

    return deco


def build_model(config: dict) -> nn.Module:
    """Build a model from its config dict; ``model.config`` holds the full resolved config.

    Keys: ``name`` (see :data:`MODELS`), ``input_shape``, ``embedding_dim`` (64), ``normalize``
    (True), and the model's own keys (:data:`MODEL_DEFAULTS`; mlp: ``hidden``, ``dropout``;
    cnn: ``channels``, ``dropout``, ``pool``, ``input_norm``, ``tta``). Unknown names or keys
    raise :class:`~tripletlab.errors.InputError`; nothing outside :data:`MODELS` is ever built.

    Example:
        >>> import torch
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
