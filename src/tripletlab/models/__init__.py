"""Embedding networks with an L2-normalised head, a name -> class registry, and augmentation.

One module per model (``mlp.py``, ``cnn.py``, ``backbones.py``), registered with
``@register_model("name")`` (:mod:`tripletlab.models.registry`); ``build_model(config)``
rebuilds a model from the dict saved in a run's ``config.json``, and only registered names are
accepted, so a config file can never import arbitrary code.
"""

from ..data.augment import Augment, build_augment
from .backbones import BACKBONES, BackboneEmbedding
from .cnn import EmbeddingCNN
from .heads import EmbeddingHead
from .mlp import EmbeddingMLP
from .registry import MODEL_DEFAULTS, MODELS, build_model, default_model_config, register_model

__all__ = [
    "MODELS",
    "MODEL_DEFAULTS",
    "Augment",
    "BACKBONES",
    "BackboneEmbedding",
    "EmbeddingCNN",
    "EmbeddingHead",
    "EmbeddingMLP",
    "build_augment",
    "build_model",
    "default_model_config",
    "register_model",
]
