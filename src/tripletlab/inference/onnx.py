"""ONNX, all of it: export a trained run (:func:`export_onnx`), read the export's metadata
(:func:`read_onnx_metadata`), run it (:class:`OnnxInference`, an :class:`Inference` whose forward
pass is onnxruntime) and check it against eager PyTorch (:func:`compare_onnx`).

Layering: this module builds on :mod:`tripletlab.inference.run` and the layers below it; the
server (:mod:`tripletlab.serve`) imports it, never the other way round.

The ONNX graph takes ``images`` (or raw ``inputs`` for vector models): float32
``(batch, *input_shape)`` with a dynamic batch axis, and returns ``embeddings`` ``(batch, dim)``.
The preprocessing a caller must apply is stored in the model's metadata (``metadata_props``):

* ``tripletlab.preprocessing``: JSON, e.g. ``{"color": "L", "resize": [H, W],
  "interpolation": "bilinear", "scale": 1/255, "layout": "NCHW", "dtype": "float32"}``
  (decode the image, convert to grey "L" or "RGB", resize to ``W x H`` bilinearly as Pillow does,
  divide by 255; the model standardises per image itself when it was trained to);
* ``tripletlab.input_shape``, ``tripletlab.embedding_dim``, ``tripletlab.distance`` (the metric
  to compare embeddings with), ``tripletlab.threshold`` (the calibrated verification distance,
  or ``null``), ``tripletlab.fingerprint`` (sha256 of the run's weights), ``tripletlab.version``.

Example:
    >>> from tripletlab.inference.onnx import export_onnx, compare_onnx
    >>> export_onnx("runs/faces", "model.onnx")  # doctest: +SKIP
    >>> compare_onnx("runs/faces", "model.onnx", ["a.png"])["max_abs_diff"]  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import __version__
from ..errors import FileFormatError, InputError, MissingFileError, require
from ..utils import atomic_write_bytes
from .run import Inference

if TYPE_CHECKING:
    import torch

__all__ = ["OnnxInference", "compare_onnx", "export_onnx", "read_onnx_metadata"]

DEFAULT_OPSET = 20  # affine_grid (the CNN's test-time zoom views) needs opset 20
_PREFIX = "tripletlab."


def _preprocessing(input_shape: list[int], fit: str = "stretch") -> dict:
    if len(input_shape) == 3:
        return {
            "color": "L" if input_shape[0] == 1 else "RGB",
            "resize": [int(input_shape[1]), int(input_shape[2])],
            # crop: scale to cover H x W, cut the centre; pad: fit inside, centre on black
            "fit": fit,
            "interpolation": "bilinear",
            "scale": 1.0 / 255.0,
            "layout": "NCHW",
            "dtype": "float32",
        }
    return {"layout": "N" + "x".join(str(s) for s in input_shape), "dtype": "float32"}


def export_onnx(
    run_dir: str | Path, out: str | Path, opset: int = DEFAULT_OPSET, batch: int = 2
) -> Path:
    """Export the run's model to ONNX at ``out`` (written atomically); returns ``out``.

    The batch axis is dynamic (``batch`` only sizes the tracing example). Raises
    :class:`~tripletlab.errors.InputError` when the model cannot be exported at ``opset``.

    Example:
        >>> export_onnx("runs/faces", "faces.onnx")  # doctest: +SKIP
        PosixPath('faces.onnx')
    """
    import torch

    onnx = require("onnx", "ONNX export")
    run_dir = Path(run_dir)
    inf = Inference.from_run(run_dir)
    model, cfg = inf.model, inf.config
    shape = list(cfg["model"]["input_shape"])
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(0))
    in_name = "images" if len(shape) == 3 else "inputs"
    buf = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            torch.onnx.export(
                model,
                (x,),
                buf,
                dynamo=False,  # the TorchScript exporter needs no onnxscript
                input_names=[in_name],
                output_names=["embeddings"],
                dynamic_axes={in_name: {0: "batch"}, "embeddings": {0: "batch"}},
                opset_version=int(opset),
            )
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        raise InputError(
            f"cannot export {run_dir} to ONNX opset {opset}: {type(e).__name__}: {e}"
        ) from None
    proto = onnx.load_from_string(buf.getvalue())
    distance, threshold = inf.distance, inf.threshold
    meta = {
        "preprocessing": json.dumps(_preprocessing(shape, inf.fit)),
        "input_shape": json.dumps(shape),
        "embedding_dim": json.dumps(int(cfg["model"]["embedding_dim"])),
        "distance": distance,
        "threshold": json.dumps(threshold),
        "fingerprint": inf.fingerprint,
        "version": __version__,
        "model": json.dumps(cfg["model"]),
    }
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = _PREFIX + k, v
    proto.producer_name = "tripletlab"
    proto.doc_string = (
        f"tripletlab embedding model from {run_dir.name}: input {in_name} float32 "
        f"(batch, {', '.join(map(str, shape))}), output embeddings (batch, "
        f"{cfg['model']['embedding_dim']}); preprocessing in metadata {_PREFIX}preprocessing"
    )
    out = Path(out)
    atomic_write_bytes(out, proto.SerializeToString())
    return out


def read_onnx_metadata(path: str | Path) -> dict:
    """The ``tripletlab.*`` metadata of an exported model (JSON values decoded).

    Example:
        >>> read_onnx_metadata("faces.onnx")["input_shape"]  # doctest: +SKIP
        [1, 56, 46]
    """
    onnx = require("onnx", "reading an ONNX model")
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise FileFormatError(f"cannot read ONNX model {path}: {e}") from None
    raw = {
        p.key[len(_PREFIX) :]: p.value for p in proto.metadata_props if p.key.startswith(_PREFIX)
    }
    if "input_shape" not in raw or "fingerprint" not in raw:
        raise FileFormatError(
            f"{path} was not exported by `tripletlab export` (no tripletlab metadata)"
        )
    out: dict = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v) if k not in ("distance", "fingerprint", "version") else v
        except ValueError:
            out[k] = v
    return out


class OnnxInference(Inference):
    """An :class:`~tripletlab.inference.Inference` whose model runs in onnxruntime: the ONNX
    file written by :func:`export_onnx` for the same run (its stored fingerprint must equal the
    run's). Preprocessing, distance, threshold and fingerprint come from ``Inference``, so both
    runtimes embed the same inputs the same way.

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
        """The run's ``Inference`` with its forward pass replaced by an onnxruntime session
        on ``onnx_path`` (``threads`` intra-op threads; 0: onnxruntime's default)."""
        ort = require("onnxruntime", "the onnx runtime")
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
        x = self._prepared(x)
        a = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        out = []
        with self._lock:
            for s in range(0, a.shape[0], batch_size):
                out.append(self.session.run(None, {self._input: a[s : s + batch_size]})[0])
        if not out:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def compare_onnx(
    run_dir: str | Path,
    onnx_path: str | Path,
    images: list[str],
    repeats: int = 20,
    batch_sizes: tuple[int, ...] = (1, 32),
    threads: int = 1,
) -> dict:
    """Embed ``images`` with eager torch and with onnxruntime: the max absolute difference of
    the embeddings and the median CPU latency per batch for each runtime.

    Example:
        >>> r = compare_onnx("runs/faces", "faces.onnx", paths)  # doctest: +SKIP
        >>> r["max_abs_diff"] <= 1e-4  # doctest: +SKIP
        True
    """
    import torch

    from ..data import load_image_files

    if not images:
        raise InputError("compare_onnx needs at least one image")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = Inference.from_run(run_dir)
        ort_inf = OnnxInference.from_run_and_onnx(run_dir, onnx_path, threads=threads)
        a = ref.embed_files(images)
        b = ort_inf.embed_files(images)
        result: dict = {
            "n_images": len(images),
            "max_abs_diff": float(np.abs(a - b).max()),
            "threads": threads,
            "latency_ms": {},
        }
        shape = ref.input_shape
        x_all, _ = load_image_files(
            [str(p) for p in images],
            image_size=tuple(shape[1:]),
            grayscale=shape[0] == 1,
            fit=ref.fit,
        )
        session, name = ort_inf.session, ort_inf.session.get_inputs()[0].name
        for bs in batch_sizes:  # the model call alone: preprocessed input in, embeddings out
            x = x_all[torch.arange(bs) % len(x_all)]
            xn = x.numpy()

            def run_torch(x=x):
                with torch.inference_mode():
                    ref.model(x)

            t_torch = _timed(run_torch, repeats)
            t_onnx = _timed(lambda xn=xn: session.run(None, {name: xn}), repeats)
            result["latency_ms"][str(bs)] = {
                "torch": 1000 * t_torch,
                "onnx": 1000 * t_onnx,
                "speedup": t_torch / t_onnx if t_onnx > 0 else None,
            }
        return result
    finally:
        torch.set_num_threads(old_threads)
