"""tripletlab: exact, fast triplet losses and online triplet mining for PyTorch."""

__version__ = "0.1.0"
