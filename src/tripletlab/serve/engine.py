"""The model behind the server: the :class:`Embedder` protocol, and its ONNX implementation.

The server needs only what :class:`Embedder` lists, which is a subset of
:class:`tripletlab.inference.Inference` (eager PyTorch, the default). :class:`OnnxInference` is
an ``Inference`` whose forward pass runs an exported model with onnxruntime, so preprocessing,
distance, threshold and fingerprint come from the same place for both runtimes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import InputError, MissingFileError
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


class OnnxInference(Inference):
    """An :class:`~tripletlab.inference.Inference` whose model runs in onnxruntime: the ONNX
    file written by :func:`tripletlab.inference.onnx.export_onnx` for the same run (its stored
    fingerprint must equal the run's).

    Example:
        >>> inf = OnnxInference.from_run_and_onnx("runs/faces", "faces.onnx")  # doctest: +SKIP
        >>> inf.embed_files(["a.pgm"]).shape  # doctest: +SKIP
        (1, 64)
    """

    runtime = "onnx"

    @classmethod
    def from_run_and_onnx(
        cls, run_dir: str | Path, onnx_path: str | Path, threads: int = 0
    ) -> OnnxInference:
        from ..inference.onnx import read_onnx_metadata

        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover
            raise InputError(
                "the onnx runtime needs onnxruntime: pip install 'tripletlab[serve]'"
            ) from None
        base = Inference.from_run(run_dir)
        meta = read_onnx_metadata(onnx_path)
        if meta.get("fingerprint") != base.fingerprint:
            raise InputError(
                f"{onnx_path} was exported from another model than {run_dir} (fingerprints "
                "differ); export it again with `tripletlab export`"
            )
        if list(meta.get("input_shape", [])) != base.input_shape:
            raise InputError(
                f"{onnx_path} takes {meta.get('input_shape')}, the run {base.input_shape}"
            )
        self = cls.__new__(cls)
        self.__dict__.update(base.__dict__)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.onnx_path = Path(onnx_path)
        self.session = ort.InferenceSession(
            str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self.session.get_inputs()[0].name
        self._lock = threading.Lock()
        return self

    def _embed_tensor(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        # the one place Inference runs its model: replaced by an onnxruntime session
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = []
        with self._lock:
            for s in range(0, a.shape[0], batch_size):
                out.append(self.session.run(None, {self._input: a[s : s + batch_size]})[0])
        if not out:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


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

    from ..inference.onnx import export_onnx

    tmp = Path(tempfile.mkdtemp(prefix="tripletlab-onnx-"))
    try:  # onnxruntime holds the model in memory: the file is not needed afterwards
        out = export_onnx(run_dir, tmp / "model.onnx")
        return OnnxInference.from_run_and_onnx(run_dir, out, threads=threads)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
