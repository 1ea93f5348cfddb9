"""The model behind the server: a small protocol, its torch and ONNX implementations.

The server only needs what :class:`Embedder` lists: turn decoded images (or raw input vectors)
into embeddings, plus the run's metadata (distance, calibrated threshold, fingerprint). The torch
implementation reads a run directory; the ONNX one runs an exported ``model.onnx`` with
onnxruntime and takes the same metadata from the run.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..errors import FileFormatError, InputError, MissingFileError

__all__ = ["Embedder", "OnnxEmbedder", "TorchEmbedder", "load_embedder", "preprocess_images"]

RUNTIMES = ("torch", "onnx")


class Embedder(Protocol):
    """What the server needs from a model (see :func:`load_embedder`)."""

    run_dir: Path
    input_shape: list[int]
    embedding_dim: int
    distance: str  # "cosine" or "euclidean": the index metric and the verification distance
    threshold: float | None
    threshold_info: dict | None
    fingerprint: str
    runtime: str

    def embed_images(self, images: list) -> np.ndarray:
        """Embeddings (N, dim) float32 of decoded PIL images."""
        ...

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        """Embeddings (N, dim) float32 of raw model inputs (N, *input_shape)."""
        ...

    def distance_between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Row-wise distances (N,) float64 in the run's distance."""
        ...


def preprocess_images(images: list, input_shape: list[int]) -> np.ndarray:
    """Decoded PIL images -> float32 (N, C, H, W) in [0, 1], exactly as the training loader
    reads files: convert to grey ("L") or "RGB" by the model's channels, bilinear resize to
    (H, W) when the size differs, divide by 255.

    Example:
        >>> from PIL import Image
        >>> preprocess_images([Image.new("RGB", (10, 8))], [1, 4, 5]).shape
        (1, 1, 4, 5)
    """
    from PIL import Image

    if len(input_shape) != 3:
        raise InputError(
            f"this model takes vectors of shape {list(input_shape)}, not images; send vectors"
        )
    c, h, w = (int(v) for v in input_shape)
    mode = "L" if c == 1 else "RGB"
    out = np.empty((len(images), c, h, w), dtype=np.float32)
    for i, im in enumerate(images):
        im = im.convert(mode)
        if im.size != (w, h):
            im = im.resize((w, h), Image.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
        out[i] = (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).astype(np.float32) / 255.0
    return out


def _check_vectors(x, input_shape: list[int]) -> np.ndarray:
    a = np.asarray(x, dtype=np.float32)
    if a.ndim == len(input_shape):
        a = a[None]
    if list(a.shape[1:]) != list(input_shape):
        raise InputError(
            f"inputs of shape {list(a.shape[1:])} but the model takes {list(input_shape)}"
        )
    if not np.isfinite(a).all():
        raise InputError("inputs contain NaN or Inf")
    return a


def _distance_between(a: np.ndarray, b: np.ndarray, distance: str) -> np.ndarray:
    import torch

    from ..distances import paired_distance

    ta = torch.from_numpy(np.atleast_2d(np.asarray(a, dtype=np.float64)))
    tb = torch.from_numpy(np.atleast_2d(np.asarray(b, dtype=np.float64)))
    if ta.shape != tb.shape:
        raise InputError(f"pairs need equal shapes, got {tuple(ta.shape)} and {tuple(tb.shape)}")
    with torch.no_grad():
        return paired_distance(ta, tb, distance).numpy()


def _run_metadata(run_dir: Path, cfg: dict) -> tuple[str, float | None, dict | None]:
    from ..train import eval_distance

    distance = eval_distance(cfg["model"])
    threshold, info = None, None
    ev_path = run_dir / "eval.json"
    if ev_path.exists():
        try:
            ev = json.loads(ev_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise FileFormatError(f"cannot read {ev_path}: {e}") from None
        t = ev.get("threshold") if isinstance(ev, dict) else None
        if isinstance(t, (int, float)) and math.isfinite(t):
            threshold = float(t)
            ver = ev.get("verification", {}) if isinstance(ev.get("verification"), dict) else {}
            info = {
                "source": "eval.json",
                "split": ev.get("split"),
                "accuracy": ver.get("accuracy"),
                "eer": ver.get("eer"),
                "far": ver.get("far_at_threshold"),
                "n_pairs_same": ver.get("n_pairs_same"),
                "n_pairs_diff": ver.get("n_pairs_diff"),
            }
    return distance, threshold, info


class TorchEmbedder:
    """Eager PyTorch inference over a run directory (one forward at a time: a lock serialises
    calls, the batching queue makes them large).

    Example:
        >>> emb = TorchEmbedder("runs/faces")  # doctest: +SKIP
        >>> emb.embed_images([Image.open("a.png")]).shape  # doctest: +SKIP
        (1, 64)
    """

    runtime = "torch"

    def __init__(self, run_dir: str | Path, device: str = "cpu") -> None:
        import torch

        from ..train import load_run, model_fingerprint

        self.run_dir = Path(run_dir)
        self.model, self.config = load_run(self.run_dir)
        self.device = device
        self.model.to(device).eval()
        self.input_shape = list(self.config["model"]["input_shape"])
        self.embedding_dim = int(self.config["model"]["embedding_dim"])
        self.distance, self.threshold, self.threshold_info = _run_metadata(
            self.run_dir, self.config
        )
        self.fingerprint = model_fingerprint(self.run_dir)
        self._torch = torch
        self._lock = threading.Lock()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with self._lock, torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            return self.model(t).float().cpu().numpy()

    def embed_images(self, images: list) -> np.ndarray:
        return self._forward(preprocess_images(images, self.input_shape))

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        return self._forward(_check_vectors(x, self.input_shape))

    def distance_between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _distance_between(a, b, self.distance)


class OnnxEmbedder:
    """onnxruntime inference of a model exported by :func:`tripletlab.export.export_onnx`;
    metadata (threshold, distance) from the run directory, whose fingerprint must match the
    one stored in the ONNX file.

    Example:
        >>> emb = OnnxEmbedder("runs/faces", "model.onnx")  # doctest: +SKIP
    """

    runtime = "onnx"

    def __init__(self, run_dir: str | Path, onnx_path: str | Path, threads: int = 0) -> None:
        from ..export import read_onnx_metadata
        from ..train import _read_json, model_fingerprint

        try:
            import onnxruntime as ort
        except ImportError:  # pragma: no cover
            raise InputError(
                "--runtime onnx needs onnxruntime: pip install 'tripletlab[serve]'"
            ) from None
        self.run_dir = Path(run_dir)
        self.onnx_path = Path(onnx_path)
        self.config = _read_json(self.run_dir / "config.json", "run config")
        meta = read_onnx_metadata(self.onnx_path)
        self.fingerprint = model_fingerprint(self.run_dir)
        if meta.get("fingerprint") != self.fingerprint:
            raise InputError(
                f"{self.onnx_path} was exported from another model than {self.run_dir} "
                "(fingerprints differ); export it again with `tripletlab export`"
            )
        self.input_shape = list(meta["input_shape"])
        self.embedding_dim = int(meta["embedding_dim"])
        self.distance, self.threshold, self.threshold_info = _run_metadata(
            self.run_dir, self.config
        )
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
            opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.onnx_path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._input = self.session.get_inputs()[0].name
        self._lock = threading.Lock()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            out = self.session.run(None, {self._input: np.ascontiguousarray(x, np.float32)})
        return np.asarray(out[0], dtype=np.float32)

    def embed_images(self, images: list) -> np.ndarray:
        return self._forward(preprocess_images(images, self.input_shape))

    def embed_vectors(self, x: np.ndarray) -> np.ndarray:
        return self._forward(_check_vectors(x, self.input_shape))

    def distance_between(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _distance_between(a, b, self.distance)


def load_embedder(
    run_dir: str | Path,
    runtime: str = "torch",
    onnx_path: str | Path | None = None,
    device: str = "cpu",
    threads: int = 0,
) -> Any:
    """The :class:`Embedder` of a run: ``runtime="torch"`` (eager) or ``"onnx"`` (onnxruntime;
    ``onnx_path`` defaults to exporting the run into a temporary file).

    Example:
        >>> emb = load_embedder("runs/faces", runtime="onnx")  # doctest: +SKIP
    """
    if runtime not in RUNTIMES:
        raise InputError(f"unknown runtime {runtime!r}; choose one of {list(RUNTIMES)}")
    if not Path(run_dir).is_dir():
        raise MissingFileError(f"run directory not found: {run_dir}")
    if runtime == "torch":
        return TorchEmbedder(run_dir, device=device)
    if onnx_path is None:
        import shutil
        import tempfile

        from ..export import export_onnx

        tmp = Path(tempfile.mkdtemp(prefix="tripletlab-onnx-"))
        try:  # onnxruntime holds the model in memory: the file is not needed afterwards
            return OnnxEmbedder(run_dir, export_onnx(run_dir, tmp / "model.onnx"), threads=threads)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return OnnxEmbedder(run_dir, onnx_path, threads=threads)
