"""Using a trained run: :class:`Inference` (``run.py``: embed files, images, vectors and data sets
exactly as training prepared them; verify with the calibrated threshold; build and search an
index), the one ``embed(model, source, ...)`` over tensors, texts, data sets and streamed image
files (``embed.py``: ``from tripletlab.inference.embed import embed``), ONNX export, runtime and
comparison (``onnx.py``), and embedding a data set across torchrun ranks (``shard.py``)."""

from .run import VECTOR_SUFFIXES, Inference

__all__ = ["VECTOR_SUFFIXES", "Inference"]
