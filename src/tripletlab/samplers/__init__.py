"""Which items form a training batch: :class:`PKSampler` (P classes x K items),
:class:`DistributedPKSampler` (one global PK batch sharded over torchrun ranks) and
:class:`HardClassSampler` (groups of mutually close classes, from the current model's
neighbour table; the pure centroid / item-kNN functions that build it live beside it).
"""

from .hard_class import HardClassSampler
from .pk import DistributedPKSampler, PKSampler

__all__ = ["DistributedPKSampler", "HardClassSampler", "PKSampler"]
