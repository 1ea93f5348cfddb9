"""Your own ``nn.Module`` and ``torch.utils.data.Dataset`` in :class:`tripletlab.train.Trainer`.

A data set yielding ``(x, label)`` pairs (tensors or arrays of one shape; labels ints or strings)
is read once into a :class:`tripletlab.data.Dataset` (held in memory, like the built-in loaders),
so the trainer's PK sampling, splits, checkpoints, metrics and report work unchanged. A custom
module is recorded in ``config.json`` by its class name; its weights are in the same
safetensors files, but rebuilding it needs your code: pass the module again to resume
(``Trainer(model=MyNet(), train_data=..., out=RUN, resume=True)``) or to use the weights.

Example:
    >>> import torch
    >>> from tripletlab.train.custom import user_datasets
    >>> pairs = [(torch.rand(3), i % 2) for i in range(6)]
    >>> train, test = user_datasets(pairs)
    >>> train.x.shape, train.classes, test is None
    (torch.Size([6, 3]), ['0', '1'], True)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data import Dataset
from ..errors import InputError

__all__ = ["CUSTOM_MODEL", "custom_model_config", "user_datasets"]

#: ``config.json``'s model name for a module passed to the Trainer (not rebuilt from config)
CUSTOM_MODEL = "custom"


def _items(data, what: str) -> tuple[list[torch.Tensor], list[Any]]:
    xs, labels = [], []
    try:
        n = len(data)
    except TypeError:
        raise InputError(f"{what} must be a map-style Dataset with __len__") from None
    for i in range(n):
        item = data[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise InputError(f"{what}[{i}] must be an (x, label) pair, got {type(item).__name__}")
        x, label = item[0], item[1]
        if isinstance(label, torch.Tensor):
            label = label.item()
        elif isinstance(label, np.generic):
            label = label.item()
        xs.append(torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x))
        labels.append(label)
    if not xs:
        raise InputError(f"{what} is empty")
    shapes = {tuple(x.shape) for x in xs}
    if len(shapes) != 1:
        raise InputError(f"{what}: items of different shapes {sorted(shapes)[:3]}; resize them")
    return xs, labels


def user_datasets(train_data, test_data=None) -> tuple[Dataset, Dataset | None]:
    """Read a torch ``Dataset`` (or any sequence) of ``(x, label)`` pairs, and optionally a
    separate test set, into :class:`~tripletlab.data.Dataset`\\ s sharing one class list (the
    sorted labels as strings). A tripletlab ``Dataset`` is passed through."""
    if isinstance(train_data, Dataset) and (test_data is None or isinstance(test_data, Dataset)):
        return train_data, test_data
    parts = [("train_data", train_data)] + ([("test_data", test_data)] if test_data else [])
    read = {what: _items(d, what) for what, d in parts}
    names = sorted({str(v) for _, labels in read.values() for v in labels}, key=_natural)
    index = {c: i for i, c in enumerate(names)}
    out = []
    for what, (xs, labels) in read.items():
        x = torch.stack(xs).float()
        kind = "image" if x.dim() == 4 else "vector"
        y = torch.tensor([index[str(v)] for v in labels], dtype=torch.long)
        out.append(Dataset(x=x, y=y, classes=names, paths=None, kind=kind, name=what))
    return out[0], (out[1] if len(out) > 1 else None)


def _natural(name: str):
    return (0, int(name)) if name.lstrip("-").isdigit() else (1, name)


def custom_model_config(model: torch.nn.Module, data: Dataset, device: str = "cpu") -> dict:
    """``config.json``'s record of a caller's module: its class, the input shape, the embedding
    size and whether its outputs are L2-normalised (measured on a few items; cosine is then the
    evaluation distance, as for the built-in heads)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(data.x[: min(8, len(data))].to(device))
    model.train(was_training)
    norms = out.float().norm(dim=1)
    cls = type(model)
    return {
        "name": CUSTOM_MODEL,
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "input_shape": list(data.input_shape),
        "embedding_dim": int(out.shape[1]),
        "normalize": bool(torch.allclose(norms, torch.ones_like(norms), atol=1e-3)),
    }
