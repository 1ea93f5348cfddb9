"""The model behind the server: the :class:`Embedder` protocol and :func:`load_embedder`.

The server needs only what :class:`Embedder` lists, which is a subset of
:class:`tripletlab.inference.Inference` (eager PyTorch, the default). The ONNX runtime,
:class:`~tripletlab.inference.onnx.OnnxInference` (an ``Inference`` whose forward pass is
onnxruntime), lives with the export in :mod:`tripletlab.inference.onnx` and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import InputError, MissingFileError
from ..inference.onnx import OnnxInference, export_onnx
from ..inference.run import Inference

__all__ = ["RUNTIMES", "Embedder", "OnnxInference", "load_embedder"]

RUNTIMES = ("torch", "onnx")


class Embedder(Protocol):
    """What the server needs from a model (``Inference`` and ``OnnxInference`` have it)."""

    run_dir: Path
    input_shape: list[int]
    embedding_dim: int
    distance: str  # "cosine" or "euclidean": the index metric and the verification distance
    threshold: float | None
    threshold_info: dict | None
    fingerprint: str

    def embed_images(self, images: list) -> np.ndarray:
        """Embeddings (N, D) float32 of decoded PIL images."""
        ...

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (N, D) float32 of raw input vectors (vector models)."""
        ...

    def distance_between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise distances (N,) float64 in the run's distance."""
        ...


def load_embedder(
    run_dir: str | Path,
    runtime: str = "torch",
    onnx_path: str | Path | None = None,
    device: str = "cpu",
    threads: int = 0,
) -> Any:
    """The :class:`Embedder` of a run: ``runtime="torch"`` (an ``Inference``) or ``"onnx"``
    (an :class:`OnnxInference`; ``onnx_path`` defaults to exporting the run at start-up).

    Example:
        >>> emb = load_embedder("runs/faces", runtime="onnx")  # doctest: +SKIP
    """
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if not Path(run_dir).is_dir():
        raise MissingFileError(f"run directory not found: {run_dir}")
    if runtime == "torch":
        return Inference.from_run(run_dir, device=device)
    if onnx_path is not None:
        return OnnxInference.from_run_and_onnx(run_dir, onnx_path, threads=threads)
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="tripletlab-onnx-"))
    try:  # onnxruntime holds the model in memory: the file is not needed afterwards
        out = export_onnx(run_dir, tmp / "model.onnx")
        return OnnxInference.from_run_and_onnx(run_dir, out, threads=threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
