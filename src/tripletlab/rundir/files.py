"""Run-directory I/O: the files ``tripletlab train`` writes and everything that reads them.

A run directory holds::

    config.json        resolved training config + model config (rebuilds the model, no code)
    split.json         the seeded train/val/test split
    model.safetensors  the best model (weights only, no pickle)
    checkpoint/        model, optimizer, scheduler, sampler and RNG states for an exact resume,
                       with a sha256 manifest (tripletlab.rundir.manifest)
    metrics.jsonl      one line per logged step / validation
    eval.json          the test evaluation (:class:`tripletlab.metrics.evaluate.EvalResult`)

Every file is written atomically; a checkpoint is written into a temporary directory and renamed
into place, so a crash leaves the previous complete one.

Example:
    >>> from tripletlab.rundir import load_run  # doctest: +SKIP
    >>> model, cfg = load_run("runs/digits")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from ..data import Dataset, load_dataset
from ..errors import FileFormatError, InputError, MissingFileError
from ..models import build_model
from ..utils import atomic_write_bytes, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from .manifest import MANIFEST, read_manifest, verify_files, write_manifest

__all__ = [
    "CHECKPOINT_FORMAT",
    "append_metrics",
    "load_checkpoint",
    "load_dataset_for_run",
    "load_run",
    "load_weights",
    "model_fingerprint",
    "read_json",
    "read_jsonl",
    "remove_stale_checkpoint_dirs",
    "save_checkpoint",
    "save_weights",
    "trim_metrics",
    "write_run_config",
]

CHECKPOINT_FORMAT = 1
_CHECKPOINT_FILES = ("state.safetensors", "optimizer.pt", "state.json")


#: what a run's config.json holds as JSON objects (a string there is a damaged file)
_RUN_CONFIG_OBJECTS = ("train", "model", "data")
_MAX_JSON_INT_DIGITS = 19  # int64; a 400-digit integer is a damaged or hostile file


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits (more than int64 holds)")
    return int(text)


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from ``path``; MissingFileError / FileFormatError naming ``what`` and the
    path otherwise: also for something that is not a regular file (a FIFO would block), an
    integer beyond int64, nesting too deep, and in a run config (``what`` "run config") a
    ``train`` / ``model`` / ``data`` entry that is not an object."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    if not path.is_file():
        raise FileFormatError(f"{what} {path} is not a regular file")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"), parse_int=_bounded_int)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FileFormatError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{what} {path} must hold a JSON object")
    if what == "run config":
        for key in _RUN_CONFIG_OBJECTS:
            if key in obj and obj[key] is not None and not isinstance(obj[key], dict):
                raise FileFormatError(
                    f"{what} {path}: {key!r} must be a JSON object, got {obj[key]!r:.60}"
                )
    return obj


def read_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a ``.jsonl`` file (bad lines skipped; a missing file is empty)."""
    path, out = Path(path), []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def append_metrics(run_dir: str | Path, record: dict) -> None:
    """Append one line to ``run_dir/metrics.jsonl``."""
    with open(Path(run_dir) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def trim_metrics(run_dir: str | Path, last_step: int) -> None:
    """Drop ``metrics.jsonl`` lines logged after ``last_step`` (a resume produces them again)."""
    path = Path(run_dir) / "metrics.jsonl"
    if path.exists():
        keep = [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor]) -> None:
    """Write a model's weights as safetensors, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors))


def write_run_config(
    run_dir: str | Path,
    train: dict,
    model: dict,
    dataset: Dataset,
    splits: dict,
    environment: dict | None = None,
) -> None:
    """Write ``run_dir/config.json``: the resolved training options, the model config (enough
    to rebuild the model with no code), the data summary, the evaluation distance and the
    environment (versions, git commit, machine; :func:`.environment.environment`)."""
    from .. import __version__
    from ..metrics.evaluate import eval_distance

    data = {k: (v.summary() if v is not None else None) for k, v in splits.items()}
    data["classes"] = list(dataset.classes) if len(dataset.classes) <= 5000 else None
    if "texts_truncated" in getattr(dataset, "info", {}):  # text data: longer than max_length
        data["texts_truncated"] = dataset.info["texts_truncated"]
    atomic_write_json(
        Path(run_dir) / "config.json",
        {
            "tripletlab_version": __version__,
            "train": train,
            "model": model,
            "data": data,
            "eval_distance": eval_distance(model),
            "environment": environment,
        },
    )


# -------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    run_dir: str | Path, tensors: dict[str, torch.Tensor], optim_state: dict, state: dict
) -> None:
    """Write ``run_dir/checkpoint`` atomically (temp dir + rename) with a checksum manifest."""
    run_dir = Path(run_dir)
    remove_stale_checkpoint_dirs(run_dir)
    tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_weights(tmp / "state.safetensors", tensors)
        buf = io.BytesIO()
        torch.save(optim_state, buf)
        atomic_write_bytes(tmp / "optimizer.pt", buf.getvalue())
        atomic_write_json(tmp / "state.json", state)
        write_manifest(tmp, _CHECKPOINT_FILES, format=CHECKPOINT_FORMAT, step=state["step"])
        fsync_dir(tmp)
    except BaseException:  # e.g. a full disk: leave the previous checkpoint, and no debris
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, old = run_dir / "checkpoint", run_dir / ".checkpoint.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def remove_stale_checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Remove the ``.checkpoint.tmp-PID`` directories of processes that no longer run (a
    checkpoint write killed halfway, e.g. by SIGKILL); returns what was removed.

    Example:
        >>> remove_stale_checkpoint_dirs("runs/x")  # doctest: +SKIP
        []
    """
    removed = []
    d = Path(run_dir)
    if not d.is_dir():
        return removed
    for p in d.glob(".checkpoint.tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid() or _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process
        return True
    return True


def load_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read and verify ``run_dir/checkpoint`` (falls back to the previous one if a crash
    interrupted the final rename). Raises FileFormatError naming the bad file."""
    run_dir = Path(run_dir)
    remove_stale_checkpoint_dirs(run_dir)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / MANIFEST).exists() and (run_dir / ".checkpoint.old").exists():
        ckpt = run_dir / ".checkpoint.old"
    man_path = ckpt / MANIFEST
    if not man_path.exists():
        raise MissingFileError(f"no complete checkpoint in {run_dir} (missing {man_path})")
    manifest = read_manifest(man_path, format=CHECKPOINT_FORMAT, what="checkpoint")
    verify_files(ckpt, manifest["files"], _CHECKPOINT_FILES, what="checkpoint")
    try:
        tensors = load_file(str(ckpt / "state.safetensors"))
        optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - e.g. UnpicklingError from weights_only=True
        raise FileFormatError(
            f"cannot read checkpoint in {ckpt}: {type(e).__name__}: {e}"
        ) from None
    return tensors, optim_state, state


# ---------------------------------------------------------------------------- a trained run


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file (no pickle); FileFormatError when unreadable."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"model weights not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileFormatError(f"cannot load weights {path}: {e}") from None


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from ``RUN_DIR/config.json`` + ``RUN_DIR/model.safetensors``.

    The config may only name registered models (nothing is imported from it); weights are read
    with safetensors (no pickle). A text model is rebuilt from the config.json and tokenizer in
    ``RUN_DIR/encoder`` (no weights there) before its weights are loaded. Returns ``(model in
    eval mode, config dict)``.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run directory not found: {run_dir}")
    cfg = read_json(run_dir / "config.json", "run config")
    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict):
        raise FileFormatError(f"{run_dir / 'config.json'} has no 'model' object")
    if model_cfg.get("name") == "custom":
        raise FileFormatError(
            f"{run_dir} was trained with your own module ({model_cfg.get('class')}); it cannot "
            "be rebuilt from config.json. In Python: build the module, then "
            "model.load_state_dict(tripletlab.rundir.load_weights(RUN_DIR/'model.safetensors')), "
            "or Trainer(model=..., train_data=..., out=RUN_DIR, resume=True)"
        )
    try:
        if model_cfg.get("name") == "text":  # architecture + tokenizer from RUN/encoder
            from ..models.text import ENCODER_DIR, build_text_encoder

            model = build_text_encoder(model_cfg, weights=False, encoder_dir=run_dir / ENCODER_DIR)
        else:
            model = build_model(model_cfg)
    except InputError as e:
        raise FileFormatError(f"{run_dir / 'config.json'}: {e}") from None
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise MissingFileError(f"model weights not found: {weights}")
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileFormatError(f"cannot load weights {weights}: {e}") from None
    model.eval()
    return model, cfg


def model_fingerprint(run_dir: str | Path) -> str:
    """sha256 of the run's model weights (identifies the embedding space of an index)."""
    return sha256_file(Path(run_dir) / "model.safetensors")


def preprocessing(cfg: dict) -> dict[str, Any]:
    """How a run's inputs were prepared: ``{"image_size": [H, W] | None, "grayscale": bool |
    None, "input_shape": [...], "equalize": "none" | "clahe"}`` from its config (training
    options, else the model's shape)."""
    train_cfg = cfg.get("train", {})
    model_shape = list(cfg.get("model", {}).get("input_shape", []))
    size = train_cfg.get("image_size")
    if size is None and len(model_shape) == 3:
        size = model_shape[1:]
    gray = train_cfg.get("grayscale")
    if gray is None and len(model_shape) == 3:
        gray = model_shape[0] == 1
    return {
        "image_size": list(size) if size else None,
        "grayscale": gray,
        "input_shape": model_shape,
        # how images reach image_size (data.loaders.fit_image); runs made before: stretch
        "fit": train_cfg.get("resize") or "stretch",
        # --equalize: applied to images alike in training and use (data.augment.preprocess)
        "equalize": train_cfg.get("equalize") or "none",
    }


def load_dataset_for_run(cfg: dict, data: str | list[str], skip_bad: bool = False) -> Dataset:
    """Load ``data`` with the preprocessing a run was trained with (image size, colour)."""
    prep = preprocessing(cfg)
    size = prep["image_size"]
    if isinstance(data, (list, tuple)):  # several image sources (classes prefixed by source)
        from ..data.open import open_data

        ds = open_data(
            list(data), image_size=tuple(size) if size else None, grayscale=prep["grayscale"],
            skip_bad=skip_bad, stream=False, fit=prep["fit"],
        )[0]  # fmt: skip
    else:
        ds = load_dataset(
            data,
            image_size=tuple(size) if size else None,
            grayscale=prep["grayscale"],
            skip_bad=skip_bad,
            fit=prep["fit"],
        )
    is_text_model = cfg.get("model", {}).get("name") == "text"
    if is_text_model != (ds.kind == "text"):
        want = (
            "a text file (.csv/.tsv/.jsonl with text,label)"
            if is_text_model
            else ("images or vectors")
        )
        raise InputError(f"data {data} is {ds.kind} data but this run's model takes {want}")
    if list(ds.input_shape) != prep["input_shape"]:
        raise InputError(
            f"data {data} has input shape {list(ds.input_shape)} but the model "
            f"expects {prep['input_shape']}"
        )
    return ds
