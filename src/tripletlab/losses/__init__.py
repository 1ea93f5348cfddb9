"""Losses and miners as ``nn.Module``\\ s: thin wrappers that hold options and call
:mod:`tripletlab.functional`.

- :class:`TripletLoss` (``triplet.py``): mine + loss in one call, with batch statistics.
- :class:`TripletMiner` (``miners.py``): index tuples in pytorch-metric-learning's convention.
- :class:`CrossBatchMemory` (``memory.py``): a FIFO bank of past embeddings (XBM).
- :class:`DistributedTripletLoss` (``distributed.py``): own anchors x the gathered global batch
  under torchrun, gradients reduce-scattered to their owners.
- :func:`cached_backward` (``gradient_cache.py``): the exact mined loss of a batch larger than
  memory (gradient caching, Gao et al. 2021); :func:`choose_chunk_size` (``chunk_choice.py``)
  its chunk size from a measured per-item activation cost and the free memory.
"""

from .chunk_choice import ChunkChoice, choose_chunk_size
from .distributed import DistributedTripletLoss, all_gather_with_grad, gather_labels
from .gradient_cache import cached_backward
from .memory import CrossBatchMemory
from .miners import TripletMiner
from .triplet import TripletLoss

__all__ = [
    "ChunkChoice",
    "CrossBatchMemory",
    "DistributedTripletLoss",
    "TripletLoss",
    "TripletMiner",
    "all_gather_with_grad",
    "cached_backward",
    "choose_chunk_size",
    "gather_labels",
]
