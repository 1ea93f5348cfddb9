"""tripletlab: exact, fast triplet losses and online triplet mining for PyTorch.

Example:
    >>> import torch
    >>> from tripletlab import TripletLoss, mine_triplets
    >>> emb = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    >>> labels = torch.arange(4).repeat_interleave(4)
    >>> loss = TripletLoss(margin=0.2, strategy="all")(emb, labels)
"""

from .distances import pairwise_distance
from .errors import FileFormatError, InputError, InputTypeError, MissingFileError, TripletLabError
from .functional import STRATEGIES, mine_triplets, triplet_loss, triplet_margin_loss
from .losses import TripletLoss
from .memory import CrossBatchMemory
from .miners import TripletMiner

__version__ = "0.1.0"

__all__ = [
    "STRATEGIES",
    "CrossBatchMemory",
    "FileFormatError",
    "InputError",
    "InputTypeError",
    "MissingFileError",
    "TripletLabError",
    "TripletLoss",
    "TripletMiner",
    "mine_triplets",
    "pairwise_distance",
    "triplet_loss",
    "triplet_margin_loss",
]
