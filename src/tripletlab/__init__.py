"""tripletlab: exact, fast triplet losses and online triplet mining for PyTorch.

The package is a tree of concept packages (``docs/architecture.md`` is the map): ``functional``
(pure mining and loss functions), ``losses``, ``samplers``, ``data``, ``models``, ``metrics``,
``index``, ``rundir``, ``runtime``, ``inference``, ``train``, ``serve``, ``report``, ``cli``,
``integrations``. The names below import from the root; the heavy ones (``Trainer``,
``TrainConfig``, ``Inference``, ``EmbeddingIndex``) load on first use.

Example:
    >>> import torch
    >>> from tripletlab import TripletLoss, mine_triplets
    >>> emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    >>> labels = torch.arange(4).repeat_interleave(4)
    >>> loss = TripletLoss(margin=0.2, strategy="all")(emb, labels)
"""

import importlib
import importlib.abc
import importlib.util
import sys
import types

from .distances import pairwise_distance
from .errors import FileFormatError, InputError, InputTypeError, MissingFileError, TripletLabError
from .functional import STRATEGIES, mine_triplets, triplet_loss, triplet_margin_loss
from .losses import CrossBatchMemory, TripletLoss, TripletMiner
from .samplers import PKSampler

__version__ = "0.1.0"

#: heavy names imported on first use: name -> module
_LAZY = {
    "EmbeddingIndex": "tripletlab.index",
    "Inference": "tripletlab.inference",
    "Trainer": "tripletlab.train",
    "TrainConfig": "tripletlab.train",
    "resolve_config": "tripletlab.train",
}

__all__ = [
    "STRATEGIES",
    "CrossBatchMemory",
    "EmbeddingIndex",
    "FileFormatError",
    "Inference",
    "InputError",
    "InputTypeError",
    "MissingFileError",
    "PKSampler",
    "TrainConfig",
    "Trainer",
    "TripletLabError",
    "TripletLoss",
    "TripletMiner",
    "mine_triplets",
    "pairwise_distance",
    "resolve_config",
    "triplet_loss",
    "triplet_margin_loss",
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tripletlab' has no attribute {name!r}")


# ------------------------------------------------------------------ module paths before 0.2
#: where the flat modules of earlier versions live now (``import tripletlab.config`` keeps
#: working and gives the new module itself, so ``monkeypatch`` on it patches the real one);
#: a tuple: the old module's names were split over these modules
MOVED_MODULES: dict[str, str | tuple[str, ...]] = {
    "tripletlab.auto": "tripletlab.train.auto",
    "tripletlab.collapse": "tripletlab.train.collapse",
    "tripletlab.config": "tripletlab.train.config",
    "tripletlab.custom": "tripletlab.train.custom",
    "tripletlab.devices": "tripletlab.runtime.devices",
    "tripletlab.distributed": ("tripletlab.losses.distributed", "tripletlab.runtime.process_group"),
    "tripletlab.environment": "tripletlab.rundir.environment",
    "tripletlab.evaluate": "tripletlab.metrics.evaluate",
    "tripletlab.export": "tripletlab.inference.onnx",
    "tripletlab.frozen": "tripletlab.train.feature_cache",
    "tripletlab.hard_classes": (
        "tripletlab.samplers.hard_class",
        "tripletlab.train.hard_class_refresh",
    ),
    "tripletlab.imagerun": "tripletlab.train.image_data",
    "tripletlab.manifest": "tripletlab.rundir.manifest",
    "tripletlab.memory": "tripletlab.losses.memory",
    "tripletlab.miners": "tripletlab.losses.miners",
    "tripletlab.models.augment": "tripletlab.data.augment",
    "tripletlab.shard": "tripletlab.inference.shard",
    "tripletlab.train_triplets": "tripletlab.train.triplet_file",
    "tripletlab.training_log": "tripletlab.train.callbacks",
    "tripletlab.training_setup": "tripletlab.train.build",
    "tripletlab.training_state": "tripletlab.train.checkpoint",
    "tripletlab.tune": "tripletlab.train.tune",
}


class _Merged(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name)
        self._targets = targets

    def __getattr__(self, attr: str):
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r}")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        target = MOVED_MODULES[spec.name]
        if isinstance(target, tuple):
            return _Merged(spec.name, target)
        return importlib.import_module(target)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
