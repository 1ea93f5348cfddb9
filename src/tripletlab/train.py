"""Training loop, checkpoints, exact resume, and evaluation of a run.

A run directory holds ``config.json`` (everything needed to rebuild the model), ``split.json``,
``model.safetensors`` (the best model), ``checkpoint/`` (model, optimizer, scheduler, sampler and
RNG states for an exact resume, with a manifest of sha256 checksums), ``metrics.jsonl`` and
``eval.json``. Every file is written atomically; a checkpoint is written into a temporary
directory and renamed into place, so a crash leaves the previous complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .config import TrainConfig
from .data import Dataset, apply_split, load_dataset, split_dataset
from .devices import amp_dtype, autocast, grad_scaler, resolve_device
from .errors import FileFormatError, InputError, MissingFileError, TripletLabError
from .losses import TripletLoss
from .metrics import few_shot_accuracy, retrieval_metrics, verification_metrics
from .models import build_augment, build_model, default_model_config
from .samplers import PKSampler
from .utils import atomic_write_bytes, atomic_write_json, atomic_write_text, sha256_file

__all__ = [
    "NonFiniteError",
    "Trainer",
    "embed",
    "evaluate_embeddings",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = 1
_STUCK_STEPS = 200  # consecutive steps with loss == margin and every triplet active


class NonFiniteError(TripletLabError):
    """The loss or a gradient became NaN/Inf during training."""


# ------------------------------------------------------------------------------------ helpers


def embed(
    model: torch.nn.Module,
    x: torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    amp: torch.dtype | None = None,
) -> torch.Tensor:
    """Embeddings of ``x`` in eval mode, in batches, returned on the CPU."""
    was_training = model.training
    model.eval()
    out = []
    dev = torch.device(device)
    with torch.no_grad(), autocast(dev, amp):
        for s in range(0, x.shape[0], batch_size):
            out.append(model(x[s : s + batch_size].to(dev)).float().cpu())
    model.train(was_training)
    if not out:
        return torch.zeros(0, getattr(model, "config", {}).get("embedding_dim", 0))
    return torch.cat(out)


def eval_distance(model_config: dict) -> str:
    """Cosine for L2-normalised heads (equivalent ranking, bounded scale), else euclidean."""
    return "cosine" if model_config.get("normalize", True) else "euclidean"


def evaluate_embeddings(
    emb: torch.Tensor, labels: torch.Tensor, distance: str, few_shot: bool = True, seed: int = 0
) -> dict:
    """Retrieval + verification (+ few-shot when there are enough classes) on one set."""
    out: dict[str, Any] = {
        "n_items": int(emb.shape[0]),
        "n_classes": int(torch.unique(labels).numel()),
    }
    out["retrieval"] = retrieval_metrics(
        emb, labels, ks=(1, 2, 4, 8), distance=distance, nmi=emb.shape[0] <= 20000, seed=seed
    )
    try:
        ver = verification_metrics(emb, labels, distance=distance, seed=seed)
        out["verification"] = {k: v for k, v in ver.items()}
    except InputError as e:
        out["verification"] = {"skipped": str(e)}
    if few_shot:
        counts = torch.bincount(labels)
        n_ok = int((counts >= 2).sum())
        if n_ok >= 2:
            n_way = min(20 if n_ok >= 20 else 5, n_ok)
            n_query = max(1, min(5, int(counts[counts >= 2].min()) - 1))
            fs = few_shot_accuracy(
                emb,
                labels,
                n_way=n_way,
                k_shot=1,
                n_query=n_query,
                n_episodes=300,
                seed=seed,
                distance=distance,
            )
            out["few_shot"] = fs
    return out


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(
    run_dir: Path, tensors: dict[str, torch.Tensor], optim_state: dict, state: dict
) -> None:
    """Write ``run_dir/checkpoint`` atomically (temp dir + rename) with a checksum manifest."""
    run_dir = Path(run_dir)
    tmp = run_dir / f".checkpoint.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    torch.save(optim_state, tmp / "optimizer.pt")
    atomic_write_json(tmp / "state.json", state)
    files = ["state.safetensors", "optimizer.pt", "state.json"]
    for f in files:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    manifest = {
        "format": CHECKPOINT_FORMAT,
        "step": state["step"],
        "files": {f: sha256_file(tmp / f) for f in files},
    }
    atomic_write_json(tmp / "manifest.json", manifest)
    _fsync_dir(tmp)
    final, old = run_dir / "checkpoint", run_dir / ".checkpoint.old"
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    if old.exists():
        shutil.rmtree(old)


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Read and verify ``run_dir/checkpoint`` (falls back to the previous one if a crash
    interrupted the final rename). Raises FileFormatError naming the bad file."""
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "manifest.json").exists() and (run_dir / ".checkpoint.old").exists():
        ckpt = run_dir / ".checkpoint.old"
    man_path = ckpt / "manifest.json"
    if not man_path.exists():
        raise MissingFileError(f"no complete checkpoint in {run_dir} (missing {man_path})")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != CHECKPOINT_FORMAT or not isinstance(files, dict):
            raise ValueError("unknown format")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FileFormatError(f"corrupt checkpoint manifest {man_path}: {e}") from None
    for name in ("state.safetensors", "optimizer.pt", "state.json"):
        p = ckpt / name
        if name not in files:
            raise FileFormatError(f"checkpoint manifest {man_path} does not list {name}")
        if not p.exists():
            raise FileFormatError(f"checkpoint file missing: {p}")
        if sha256_file(p) != files[name]:
            raise FileFormatError(f"checkpoint file {p} does not match its checksum")
    try:
        tensors = load_file(str(ckpt / "state.safetensors"))
        optim_state = torch.load(ckpt / "optimizer.pt", weights_only=True, map_location="cpu")
        state = json.loads((ckpt / "state.json").read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - e.g. UnpicklingError from weights_only=True
        raise FileFormatError(
            f"cannot read checkpoint in {ckpt}: {type(e).__name__}: {e}"
        ) from None
    return tensors, optim_state, state


def _read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise MissingFileError(f"{what} not found: {path}")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"{what} {path} must hold a JSON object")
    return obj


def load_run(run_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """Rebuild a trained model from ``RUN_DIR/config.json`` + ``RUN_DIR/model.safetensors``.

    The config may only name registered models (nothing is imported from it); weights are read
    with safetensors (no pickle).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run directory not found: {run_dir}")
    cfg = _read_json(run_dir / "config.json", "run config")
    model_cfg = cfg.get("model")
    if not isinstance(model_cfg, dict):
        raise FileFormatError(f"{run_dir / 'config.json'} has no 'model' object")
    try:
        model = build_model(model_cfg)
    except InputError as e:
        raise FileFormatError(f"{run_dir / 'config.json'}: {e}") from None
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        raise MissingFileError(f"model weights not found: {weights}")
    try:
        state = load_file(str(weights))
        model.load_state_dict(state)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileFormatError(f"cannot load weights {weights}: {e}") from None
    model.eval()
    return model, cfg


def model_fingerprint(run_dir: str | Path) -> str:
    """sha256 of the run's model weights (identifies the embedding space of an index)."""
    return sha256_file(Path(run_dir) / "model.safetensors")


# ----------------------------------------------------------------------------------- trainer


@dataclass
class _Running:
    step: int = 0
    best: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0
    collapse_warned: bool = False
    history: list = field(default_factory=list)


class Trainer:
    """Trains an embedding model with triplet loss on PK batches.

    Example:
        >>> from tripletlab.config import resolve_config
        >>> from tripletlab.train import Trainer
        >>> cfg = resolve_config(overrides={"data": "digits", "steps": 20, "quiet": True,
        ...                                 "out": "/tmp/tl-doc-run", "report": False})
        >>> result = Trainer(cfg).fit()  # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=print) -> None:
        self.cfg = cfg
        self.log = log
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(cfg.out or f"runs/{Path(cfg.data).name or cfg.data}-{stamp}")
        self.resume = resume
        if not resume and (self.run_dir / "checkpoint").exists():
            raise InputError(
                f"{self.run_dir} already holds a run; use --resume {self.run_dir} to continue "
                "it or choose another --out"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        self.amp = amp_dtype(self.device, cfg.amp)
        self.scaler = grad_scaler(self.device, self.amp)
        self.files = None  # ImageFiles of the whole data set when images are streamed
        self.choices: list[str] = []
        self._prepare_data()
        self._build()

    # ---------------------------------------------------------------- data and model
    def _prepare_data(self) -> None:
        from .imagerun import open_data

        ds, self.files, self.choices = open_data(self.cfg, resume=self.resume)
        for line in self.choices:
            self.log(f"auto: {line}")
        cfg = self.cfg
        self.dataset = ds
        split_path = self.run_dir / "split.json"
        if self.resume and split_path.exists():
            info = _read_json(split_path, "split")
            test_info = info["test"]
            train, test = apply_split(ds, test_info)
            self.train_full = train
            val_info = info.get("val")
            train, val = apply_split(train, val_info) if val_info else (train, None)
        else:
            by = cfg.split_by or (
                "predefined"
                if ds.predefined_split
                else "sample"
                if cfg.data == "digits" or (ds.kind == "vector" and ds.n_classes < 20)
                else "class"
            )
            train, test, test_info = split_dataset(
                ds,
                by=by,
                test_fraction=cfg.test_fraction,
                seed=cfg.seed,
                test_classes=cfg.test_classes if by == "class" else None,
                class_order=cfg.class_order,
            )
            self.train_full = train
            val, val_info = None, None
            if cfg.val_fraction > 0 and cfg.evaluate:
                vby = "class" if by == "class" else "sample"
                train, val, val_info = split_dataset(
                    train, by=vby, test_fraction=cfg.val_fraction, seed=cfg.seed + 1
                )
            atomic_write_json(split_path, {"test": test_info, "val": val_info})
        self.train_set, self.val_set, self.test_set = train, val, test
        self.test_info = test_info
        if len(torch.unique(train.y)) < 2:
            raise InputError("the training split has fewer than 2 classes")

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        ds = self.train_set
        shape = self.files.input_shape if self.files is not None else ds.input_shape
        mcfg = default_model_config(shape, cfg.embedding_dim)
        if cfg.model:
            mcfg["name"] = cfg.model
        if cfg.backbone:
            mcfg.update({"name": "backbone", "backbone": cfg.backbone, "pool": cfg.pool})
            mcfg.update({"neck": cfg.neck, "freeze_bn": cfg.freeze_bn})
            mcfg["freeze_stages"] = cfg.freeze_stages
        mcfg.update(cfg.model_options)
        self.model = build_model(mcfg)
        if (cfg.pretrained or cfg.weights) and not self.resume:
            src = self.model.load_pretrained("imagenet" if cfg.pretrained else cfg.weights)
            self.log(f"backbone {cfg.backbone}: weights from {src}")
        self.model.to(self.device)
        # channels-last convolutions are faster on CUDA (tensor cores); on the CPU they are not
        self.channels_last = self.device.type == "cuda" and cfg.backbone is not None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        aug = cfg.augment if cfg.augment is not None else ("light" if ds.kind == "image" else None)
        self.augment = None
        if ds.kind == "image" and self.files is None:
            self.augment = build_augment(aug, seed=cfg.seed + 2)
        self.loss_fn = TripletLoss(
            margin=cfg.margin,
            strategy=cfg.strategy,
            distance=cfg.distance,
            soft_margin=cfg.soft_margin,
            semihard_fallback=cfg.semihard_fallback,
            seed=cfg.seed + 3,
        )
        n_cls = int(torch.unique(ds.y).numel())
        if cfg.p > n_cls:
            self.log(f"note: {n_cls} training classes, so P = {n_cls} classes per batch")
        self.sampler = PKSampler(ds.y, p=min(cfg.p, n_cls), k=cfg.k, seed=cfg.seed)
        self.total_steps = cfg.steps or cfg.epochs * len(self.sampler)
        self.eval_every = cfg.eval_every or len(self.sampler)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        lr = cfg.lr if cfg.lr is not None else (3e-4 if cfg.backbone else 1e-3)
        if hasattr(self.model, "param_groups"):  # backbone: lower lr than the head
            params = self.model.param_groups(lr, cfg.backbone_lr_mult)
        else:
            params = self.model.parameters()
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
        self.stream = None
        if self.files is not None:
            from .imagerun import make_stream

            self.stream = make_stream(self, aug)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total_steps)
        )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.state = _Running()
        self.model_config = self.model.config
        atomic_write_json(
            self.run_dir / "config.json",
            {
                "tripletlab_version": __version__,
                "train": cfg.to_dict(),
                "model": self.model_config,
                "data": {
                    "train": self.train_set.summary(),
                    "test": self.test_set.summary(),
                    "val": self.val_set.summary() if self.val_set is not None else None,
                    "classes": self.dataset.classes if len(self.dataset.classes) <= 5000 else None,
                },
                "eval_distance": eval_distance(self.model_config),
            },
        )
        if self.resume:
            self._restore()

    # ---------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if self.augment is not None:
            tensors["rng.augment"] = self.augment.get_state()
        if self.loss_fn.generator is not None:
            tensors["rng.loss"] = self.loss_fn.generator.get_state()
        st = self.state
        state = {
            "step": st.step,
            "best": st.best,
            "best_step": st.best_step,
            "evals_without_improvement": st.evals_without_improvement,
            "skipped_nonfinite": st.skipped_nonfinite,
            "sampler": (self.stream or self.sampler).state_dict(),
            "scheduler": self.sched.state_dict(),
            "total_steps": self.total_steps,
        }
        save_checkpoint(self.run_dir, tensors, self.opt.state_dict(), state)

    def _restore(self) -> None:
        tensors, optim_state, state = load_checkpoint(self.run_dir)
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            self.model.load_state_dict(model_state)
            self.opt.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as e:
            raise FileFormatError(
                f"checkpoint in {self.run_dir} does not fit this model: {e}"
            ) from None
        sched = state["scheduler"]
        self.sched.load_state_dict({**sched, "lr_lambdas": [None]})
        torch.set_rng_state(tensors["rng.torch"])
        if self.augment is not None and "rng.augment" in tensors:
            self.augment.set_state(tensors["rng.augment"])
        if self.loss_fn.generator is not None and "rng.loss" in tensors:
            self.loss_fn.generator.set_state(tensors["rng.loss"])
        (self.stream or self.sampler).load_state_dict(state["sampler"])
        st = self.state
        st.step, st.best, st.best_step = state["step"], state["best"], state["best_step"]
        st.evals_without_improvement = state["evals_without_improvement"]
        st.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        # drop log lines written after the checkpoint (they will be produced again)
        mpath = self.run_dir / "metrics.jsonl"
        if mpath.exists():
            keep = []
            for line in mpath.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= st.step:
                        keep.append(line)
                except json.JSONDecodeError:
                    continue
            atomic_write_text(mpath, "".join(x + "\n" for x in keep))
        self.log(f"resumed {self.run_dir} at step {st.step}/{self.total_steps}")

    def _save_best(self) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        tmp = self.run_dir / ".model.safetensors.tmp"
        save_file(tensors, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.run_dir / "model.safetensors")

    # ---------------------------------------------------------------- logging
    def _write_metrics(self, record: dict) -> None:
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def validate(self) -> dict | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        emb, labels = self.embed_split(self.val_set)
        try:
            m = retrieval_metrics(
                emb, labels, ks=(1, 4), nmi=False, distance=eval_distance(self.model_config)
            )
        except InputError:
            return None
        return m

    def embed_split(self, part: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a split (streamed from disk when the images are)."""
        if self.files is None:
            emb = embed(self.model, part.x, self.cfg.eval_batch_size, self.device, self.amp)
            return emb, part.y
        from .imagerun import embed_part

        return embed_part(self, part)

    def _batches(self):
        """Training batches: index lists (in memory) or (x, y) from the image stream."""
        if self.stream is None:
            yield from self.sampler
            return
        while True:
            x, y, _ = next(self.stream)
            yield x, y

    # ---------------------------------------------------------------- the loop
    def _step(self, idx) -> tuple[float, dict]:
        cfg = self.cfg
        if isinstance(idx, tuple):  # streamed (already augmented) batch
            x, y = idx[0].to(self.device, non_blocking=True), idx[1].to(self.device)
        else:
            x = self.train_set.x[idx].to(self.device)
            y = self.train_set.y[idx].to(self.device)
        if self.augment is not None:
            x = self.augment(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if hasattr(self.model, "set_backbone_trainable"):  # head-only warm-up
            self.model.set_backbone_trainable(self.state.step >= cfg.head_warmup_steps)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            emb = self.forward(x)
        emb = emb.float()
        if not bool(torch.isfinite(emb).all()):
            return self._nonfinite("embeddings")
        loss = self.loss_fn(emb, y)
        stats = self.loss_fn.stats
        if not bool(torch.isfinite(loss)):
            return self._nonfinite("loss")
        if self.scaler is not None:  # float16 on CUDA
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all()):
            if self.scaler is not None:  # the scaler lowers its scale and skips the step
                self.scaler.step(self.opt)
                self.scaler.update()
                self.sched.step()
                return float(loss.detach()), {**stats, "skipped": "fp16 overflow"}
            return self._nonfinite("gradients")
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        self.sched.step()
        return float(loss.detach()), stats

    def _nonfinite(self, what: str):
        st = self.state
        if self.cfg.skip_nonfinite:
            st.skipped_nonfinite += 1
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            return float("nan"), {"skipped": what}
        raise NonFiniteError(
            f"non-finite {what} at step {st.step + 1}; the last good checkpoint in "
            f"{self.run_dir / 'checkpoint'} is intact. Lower --lr, check the data for "
            "NaN/Inf, or pass --skip-nonfinite to skip such steps"
        )

    def _check_collapse(self, stats: dict, loss: float) -> None:
        md = stats.get("mean_distance", 1.0)
        at_margin = stats.get("active_fraction", 0) > 0.99 and abs(loss - self.cfg.margin) < 1e-3
        # loss pinned at the margin is normal for a few early batch-hard steps; persistent = bad
        self._stuck_steps = self._stuck_steps + 1 if at_margin else 0
        stuck = self._stuck_steps >= _STUCK_STEPS
        if (md < 1e-3 or stuck) and not self.state.collapse_warned:
            self.state.collapse_warned = True
            warnings.warn(
                f"embedding collapse at step {self.state.step}: mean pairwise distance {md:.2e}, "
                f"active fraction {stats.get('active_fraction', 0):.2f}, loss {loss:.4f} "
                "(= the margin). Advice: lower the learning rate, use strategy 'semihard' "
                "instead of 'hard', or a larger batch with more classes (--p).",
                stacklevel=2,
            )
            self.collapse = {"step": self.state.step, "mean_distance": md}

    def threads(self) -> int | None:
        """CPU threads for this run: ``cfg.threads``; by default 1 for vector data (a small MLP
        step gains nothing from more threads and slows down badly on a busy machine), else
        torch's default (None)."""
        if self.cfg.threads:
            return self.cfg.threads
        return 1 if self.device.type == "cpu" and self.train_set.kind == "vector" else None

    def fit(self) -> dict:
        """Train to the configured number of steps, evaluate on the test split, return eval."""
        previous, n = torch.get_num_threads(), self.threads()
        if n:
            torch.set_num_threads(n)
        try:
            return self._fit()
        finally:
            torch.set_num_threads(previous)

    def _fit(self) -> dict:
        from tqdm import tqdm

        cfg, st = self.cfg, self.state
        self.collapse = None
        self._stuck_steps = 0
        show = not cfg.quiet and sys.stderr.isatty()
        bar = tqdm(
            total=self.total_steps,
            initial=st.step,
            disable=not show,
            unit="step",
            dynamic_ncols=True,
        )
        t_start = time.perf_counter()
        t_log, seen = time.perf_counter(), 0
        self._step_seconds, self._step_samples = 0.0, 0  # training steps only (throughput)
        if st.step == 0:
            self._save()
            if self.val_set is None:
                self._save_best()
        stop = False
        while st.step < self.total_steps and not stop:
            for idx in self._batches():
                t_step = time.perf_counter()
                loss, stats = self._step(idx)
                self._step_seconds += time.perf_counter() - t_step
                n_batch = len(idx[1]) if isinstance(idx, tuple) else len(idx)
                self._step_samples += n_batch
                st.step += 1
                seen += n_batch
                bar.update(1)
                if "skipped" not in stats:
                    self._check_collapse(stats, loss)
                if st.step % cfg.log_every == 0 or st.step == self.total_steps:
                    now = time.perf_counter()
                    rec = {
                        "step": st.step,
                        "epoch": self.sampler.epoch,
                        "loss": loss,
                        "lr": self.sched.get_last_lr()[0],
                        "samples_per_s": seen / max(now - t_log, 1e-9),
                    }
                    rec.update(
                        {
                            k: stats[k]
                            for k in (
                                "active_fraction",
                                "mean_d_ap",
                                "mean_d_an",
                                "mean_distance",
                                "n_triplets",
                            )
                            if k in stats
                        }
                    )
                    self._write_metrics(rec)
                    t_log, seen = now, 0
                    bar.set_postfix(
                        loss=f"{loss:.4f}", active=f"{stats.get('active_fraction', 0):.2f}"
                    )
                if st.step % self.eval_every == 0 or st.step == self.total_steps:
                    m = self.validate()
                    if m is not None:
                        self._write_metrics(
                            {
                                "step": st.step,
                                "type": "eval",
                                **{
                                    k: m[k]
                                    for k in (
                                        "precision_at_1",
                                        "recall_at_4",
                                        "r_precision",
                                        "map_at_r",
                                    )
                                },
                            }
                        )
                        if m["map_at_r"] > st.best:
                            st.best, st.best_step = m["map_at_r"], st.step
                            st.evals_without_improvement = 0
                            self._save_best()
                        else:
                            st.evals_without_improvement += 1
                            if cfg.patience and st.evals_without_improvement >= cfg.patience:
                                self.log(
                                    f"early stopping at step {st.step}: no MAP@R "
                                    f"improvement in {cfg.patience} evaluations"
                                )
                                stop = True
                    else:
                        self._save_best()
                if st.step % self.ckpt_every == 0 or st.step == self.total_steps or stop:
                    self._save()
                if st.step >= self.total_steps or stop:
                    break
        bar.close()
        if self.stream is not None:
            self.stream.close()
        train_time = time.perf_counter() - t_start
        if not cfg.evaluate:
            return {
                "evaluated": False,
                "train_time_s": train_time,
                "train_samples_per_s": self._throughput(),
                "steps": st.step,
                "best_step": st.best_step,
                "skipped_nonfinite_steps": st.skipped_nonfinite,
                "collapse": self.collapse,
            }
        return self.final_evaluation(train_time)

    def _throughput(self) -> float | None:
        """Training samples per second over the optimisation steps of this session (data
        indexing, augmentation, forward, loss, backward and update; no validation)."""
        secs = getattr(self, "_step_seconds", 0.0)
        return self._step_samples / secs if secs > 0 else None

    def final_evaluation(self, train_time: float) -> dict:
        """Evaluate the best model on the held-out test split; write eval.json."""
        model, _ = load_run(self.run_dir)
        self.model.load_state_dict(model.state_dict())
        dist = eval_distance(self.model_config)
        emb, test_y = self.embed_split(self.test_set)
        result: dict[str, Any] = {
            "split": "test",
            "distance": dist,
            "train_time_s": train_time,
            "train_samples_per_s": self._throughput(),
            "steps": self.state.step,
            "best_step": self.state.best_step,
            "best_val_map_at_r": self.state.best if self.state.best >= 0 else None,
            "skipped_nonfinite_steps": self.state.skipped_nonfinite,
            "collapse": self.collapse,
        }
        if self.choices:
            result["auto"] = self.choices
        if self.stream is not None and self.stream.skipped:
            result["skipped_bad_images"] = self.stream.skipped
        if len(test_y) >= 2:
            result.update(evaluate_embeddings(emb, test_y, dist, seed=self.cfg.seed))
        if self.test_info.get("by") == "predefined" and len(self.test_set):
            # the benchmark protocol of predefined splits (e.g. Fashion-MNIST): test queries
            # retrieved against the training items
            ref, ref_y = self.embed_split(self.train_full)
            result["retrieval_test_to_train"] = retrieval_metrics(
                ref,
                ref_y,
                ks=(1, 2, 4, 8),
                distance=dist,
                query_embeddings=emb,
                query_labels=test_y,
                nmi=False,
            )
        ver = result.get("verification", {})
        if "threshold" in ver:
            result["threshold"] = ver["threshold"]
        atomic_write_json(self.run_dir / "eval.json", _jsonable(result))
        return result


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def summary_lines(result: dict, run_dir: Path) -> list[str]:
    """A one-screen summary of a run's test evaluation."""
    r = result.get("retrieval", {})
    v = result.get("verification", {})
    fs = result.get("few_shot")
    best = result.get("best_step")
    lines = [
        f"run: {run_dir}",
        f"trained {result.get('steps')} steps in {result.get('train_time_s', 0):.1f}s "
        + (
            f"({result['train_samples_per_s']:.0f} samples/s) "
            if isinstance(result.get("train_samples_per_s"), float)
            else ""
        )
        + (
            f"(best validation step {best})"
            if isinstance(best, int) and best >= 0
            else "(no validation: the final model is kept)"
        ),
    ]
    if result.get("evaluated") is False:
        lines.append(
            f"evaluation skipped (--no-eval): `tripletlab eval --model {run_dir}` evaluates "
            "the test split; `tripletlab verify` then needs --threshold"
        )
        return lines
    lines.append(
        f"test: {result.get('n_items', 0)} items, {result.get('n_classes', 0)} classes, "
        f"distance {result.get('distance')}"
    )
    r2 = result.get("retrieval_test_to_train")
    if r2:
        lines.append(
            "retrieval test -> train: "
            + ", ".join(f"{k}={r2[k]:.4f}" for k in ("recall_at_1", "recall_at_4", "map_at_r"))
        )
    if r:
        lines.append(
            "retrieval: "
            + ", ".join(
                f"{k}={r[k]:.4f}"
                for k in ("precision_at_1", "recall_at_4", "r_precision", "map_at_r", "nmi")
                if isinstance(r.get(k), float)
            )
        )
    if "roc_auc" in v:
        tar = v.get("tar_at_far", {})
        lines.append(
            f"verification: ROC AUC={v['roc_auc']:.4f}, EER={100 * v['eer']:.2f}%, "
            f"accuracy={v['accuracy']:.4f} at threshold {v['threshold']:.4f}, "
            + ", ".join(f"TAR@FAR={float(k):g}: {t:.3f}" for k, t in tar.items())
        )
    if fs:
        lines.append(
            f"few-shot: {fs['n_way']}-way {fs['k_shot']}-shot accuracy "
            f"{fs['accuracy']:.4f} ± {fs['ci95']:.4f}"
        )
    if result.get("collapse"):
        lines.append(f"WARNING: embedding collapse detected: {result['collapse']}")
    if result.get("skipped_nonfinite_steps"):
        lines.append(f"skipped {result['skipped_nonfinite_steps']} non-finite steps")
    return lines


def load_dataset_for_run(cfg: dict, data: str, skip_bad: bool = False) -> Dataset:
    """Load ``data`` with the preprocessing a run was trained with (image size, colour)."""
    train_cfg = cfg.get("train", {})
    size = train_cfg.get("image_size")
    model_shape = cfg.get("model", {}).get("input_shape", [])
    if size is None and len(model_shape) == 3:
        size = model_shape[1:]
    gray = train_cfg.get("grayscale")
    if gray is None and len(model_shape) == 3:
        gray = model_shape[0] == 1
    ds = load_dataset(
        data, image_size=tuple(size) if size else None, grayscale=gray, skip_bad=skip_bad
    )
    if list(ds.input_shape) != list(model_shape):
        raise InputError(
            f"data {data} has input shape {list(ds.input_shape)} but the model "
            f"expects {list(model_shape)}"
        )
    return ds


def write_bytes(path, data):  # re-exported for the CLI
    atomic_write_bytes(path, data)
