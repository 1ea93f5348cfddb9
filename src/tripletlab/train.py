"""The training loop: :class:`Trainer` trains an embedding model with triplet loss on PK batches.

Reading order: ``Trainer.__init__`` loads and splits the data (``_prepare_data``) and builds the
model, loss, sampler and optimiser (``_build``); ``fit`` runs ``_fit``, whose loop is one
``_train_step`` per PK batch followed by ``_log_step``, ``_maybe_validate`` and
``_maybe_checkpoint``; ``final_evaluation`` evaluates the best model on the test split and writes
``eval.json``. Files of the run directory are written by :mod:`tripletlab.rundir`; metrics come
from :mod:`tripletlab.evaluate`.
"""

from __future__ import annotations

import copy
import math
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .collapse import CollapseDetector
from .config import TrainConfig, resolve_config
from .custom import custom_model_config, user_datasets
from .data import Dataset, apply_split, split_dataset, split_validation
from .devices import amp_dtype, autocast, grad_scaler, resolve_device
from .distributed import (
    DistEnv,
    DistributedTripletLoss,
    any_rank,
    broadcast_flag,
    convert_sync_batchnorm_any,
    init_from_env,
    shutdown,
)
from .environment import environment
from .errors import (
    FileFormatError,
    InputError,
    NonFiniteError,
    TrainingInterrupted,
    TripletLabError,
)
from .evaluate import (
    EvalResult,
    embed,
    eval_distance,
    evaluate_embeddings,
    summary_lines,
    validation_threshold,
)
from .losses import TripletLoss
from .memory import CrossBatchMemory
from .metrics import retrieval_metrics
from .models import build_augment, build_model, default_model_config
from .rundir import (
    append_metrics,
    load_checkpoint,
    load_dataset_for_run,
    load_run,
    load_weights,
    model_fingerprint,
    read_json,
    save_checkpoint,
    save_weights,
    trim_metrics,
    write_run_config,
)
from .samplers import DistributedPKSampler, PKSampler
from .utils import atomic_write_json, jsonable

__all__ = [
    "CollapseDetector",
    "NonFiniteError",
    "Trainer",
    "embed",
    "evaluate_embeddings",
    "load_checkpoint",
    "load_run",
    "save_checkpoint",
    # re-exported for code written against the single-module trainer
    "eval_distance",
    "load_dataset_for_run",
    "model_fingerprint",
    "summary_lines",
]

_LOGGED_STATS = (
    "active_fraction",
    "mean_d_ap",
    "mean_d_an",
    "mean_distance",
    "n_triplets",
    "memory_active_fraction",
    "memory_n_triplets",
)
_VAL_METRICS = ("precision_at_1", "recall_at_4", "r_precision", "map_at_r")


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _clock(seconds: float) -> str:
    """``h:mm:ss`` / ``m:ss`` of a duration ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


@dataclass
class _Running:
    step: int = 0
    best: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0


class Trainer:
    """Trains an embedding model with triplet loss on PK batches.

    Example:
        >>> from tripletlab.config import resolve_config
        >>> from tripletlab.train import Trainer
        >>> cfg = resolve_config(overrides={"data": "digits", "steps": 20, "quiet": True,
        ...                                 "out": "/tmp/tl-doc-run", "report": False})
        >>> result = Trainer(cfg).fit()  # doctest: +SKIP
    """

    #: the validation metric that picks the saved model, and the ones logged
    selection_metric = "map_at_r"
    val_metrics = _VAL_METRICS

    def __init__(
        self,
        cfg: TrainConfig | None = None,
        resume: bool = False,
        log=print,
        *,
        model: torch.nn.Module | None = None,
        train_data=None,
        test_data=None,
        loss: torch.nn.Module | None = None,
        **options,
    ) -> None:
        if cfg is None:
            cfg = resolve_config(None, options)
        elif options:
            raise InputError(f"pass options in cfg or as keywords, not both: {sorted(options)}")
        self.cfg = cfg
        self.log = log
        self._user_model, self._user_loss = model, loss
        self._user_data = None
        if train_data is not None:
            self._user_data = user_datasets(train_data, test_data)
            cfg.data = f"python:{type(train_data).__name__}"
        elif test_data is not None:
            raise InputError("test_data needs train_data")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = "custom" if self._user_data else Path(cfg.data).name or cfg.data
        self.run_dir = Path(cfg.out or f"runs/{name}-{stamp}")
        self.resume = resume
        # torchrun: join the process group; rank 0 alone writes files (see docs/scaling.md)
        self.device = resolve_device(cfg.device)
        self.dist: DistEnv | None = (
            init_from_env(str(self.device), cfg.dist_timeout) if cfg.distributed else None
        )
        if self.dist is not None and self.device.type == "cuda":  # one GPU per rank
            self.device = torch.device("cuda", self.dist.local_rank)
        self.is_main = self.dist is None or self.dist.is_main
        if not resume and (self.run_dir / "checkpoint").exists():
            raise InputError(
                f"{self.run_dir} already holds a run; use --resume {self.run_dir} to continue "
                "it or choose another --out"
            )
        # a run that fails before its first step leaves no directory behind (only one that
        # this trainer created is removed)
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        #: called as ``on_validate(step, metrics)`` after each validation (e.g. a search's
        #: pruning); it may raise to stop the run
        self.on_validate = None
        #: False: ``fit`` stops after training (no test evaluation; model selection only)
        self.evaluate_test = True
        self.amp = amp_dtype(self.device, cfg.amp)
        self.scaler = grad_scaler(self.device, self.amp)
        self.files = None  # ImageFiles of the whole data set when images are streamed
        self.stream = None  # their PK stream (set by _build)
        self.channels_last = False
        self.choices: list[str] = []  # automatic choices made from the data (imagerun)
        self._time_before = 0.0  # training seconds of earlier sessions (resume)
        self._tb = None  # the TensorBoard writer while fitting (--tensorboard)
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as e:
                self._remove_unstarted_run()
                raise InputError(
                    f"--tensorboard needs tensorboard ({e}): pip install 'tripletlab[tensorboard]'"
                ) from None
        try:
            self._prepare_data()
            self._build()
        except BaseException:
            self._remove_unstarted_run()
            raise

    def _remove_unstarted_run(self) -> None:
        if not getattr(self, "is_main", True):  # rank 0 owns the run directory
            return
        if self._created_dir and getattr(self, "state", _Running()).step == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # ---------------------------------------------------------------- data and model
    def _prepare_data(self) -> None:
        from .imagerun import open_data

        cfg = self.cfg
        if self._user_data is not None:
            ds, given_test = self._user_data
        else:
            ds, self.files, self.choices = open_data(cfg, resume=self.resume)
            for line in self.choices:
                self.log(f"auto: {line}")
            given_test = None
        self.dataset = ds
        split_path = self.run_dir / "split.json"
        if self.resume and split_path.exists():
            info = read_json(split_path, "split")
            test_info = info["test"]
            train, test = (ds, given_test) if given_test is not None else apply_split(ds, test_info)
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
            if given_test is not None:  # the caller's own test set
                train, test = ds, given_test
                test_info = {"by": "given", "test_items": len(test)}
            else:
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
            if (cfg.val_fraction > 0 or cfg.val_folds > 1) and cfg.evaluate:
                if by == "class":  # open-set: whole (groups of) training classes held out
                    train, val, val_info = split_validation(
                        train,
                        fraction=cfg.val_fraction,
                        seed=cfg.seed + 1,
                        group_depth=cfg.val_group_depth,
                        folds=cfg.val_folds,
                        fold=cfg.val_fold,
                    )
                else:
                    train, val, val_info = split_dataset(
                        train, by="sample", test_fraction=cfg.val_fraction, seed=cfg.seed + 1
                    )
            if self.is_main:
                atomic_write_json(split_path, {"test": test_info, "val": val_info})
        self.train_set, self.val_set, self.test_set = train, val, test
        self.test_info = test_info
        if len(torch.unique(train.y)) < 2:
            raise InputError("the training split has fewer than 2 classes")

    def splits(self) -> dict:
        """The train / val / test data sets of this run (val None without validation)."""
        return {"train": self.train_set, "test": self.test_set, "val": self.val_set}

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        ds = self.train_set
        if ds.kind == "text":
            self.model = self._build_text_model().to(self.device)
        elif self._user_model is not None:
            self.model = self._user_model.to(self.device)
            self._initial_state = {
                k: v.detach().clone() for k, v in self.model.state_dict().items()
            }
        else:
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
        # the caller's data is used as given (augment only when asked for by name)
        auto = "light" if ds.kind == "image" and self._user_data is None else None
        aug = cfg.augment if cfg.augment is not None else auto
        aug_seed = cfg.seed + 2 + (1000 * self.dist.rank if self.dist else 0)  # own draws per rank
        self.augment = None
        if ds.kind == "image" and self.files is None:  # streamed images augment in the workers
            self.augment = build_augment(aug, seed=aug_seed)
        if self._user_loss is not None:
            self.loss_fn = self._user_loss
            for key in ("margin", "strategy", "distance", "soft_margin", "semihard_fallback"):
                if hasattr(self.loss_fn, key):  # recorded in config.json, used by the report
                    setattr(cfg, key, getattr(self.loss_fn, key))
        else:
            self.loss_fn = TripletLoss(
                margin=cfg.margin,
                strategy=cfg.strategy,
                distance=cfg.distance,
                soft_margin=cfg.soft_margin,
                semihard_fallback=cfg.semihard_fallback,
                seed=cfg.seed + 3,
            )
        self.criterion = self._build_criterion()
        n_cls = int(torch.unique(ds.y).numel())
        if cfg.p > n_cls:
            self.log(f"note: {n_cls} training classes, so P = {n_cls} classes per batch")
        self.sampler = PKSampler(ds.y, p=min(cfg.p, n_cls), k=cfg.k, seed=cfg.seed)
        if self.dist is not None:
            self.sampler = DistributedPKSampler(self.sampler, self.dist.rank, self.dist.world_size)
        self.total_steps = cfg.steps or self._epochs() * len(self.sampler)
        self.eval_every = cfg.eval_every or len(self.sampler)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        if hasattr(self.model, "param_groups"):  # backbone: lower lr than the head
            params = self.model.param_groups(self._lr(), cfg.backbone_lr_mult)
        else:
            params = self.model.parameters()
        self.opt = torch.optim.AdamW(params, lr=self._lr(), weight_decay=cfg.weight_decay)
        self.stream = None
        if self.files is not None:
            from .imagerun import make_stream

            self.stream = make_stream(self, aug)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total_steps)
        )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if self.dist is not None:  # gradients averaged over ranks (the loss is scaled for it)
            # BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, ours on gloo
            if self.dist.backend == "nccl":
                self.forward = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.forward)
            else:
                self.forward = convert_sync_batchnorm_any(self.forward)
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward)
        self.state = _Running()
        self.model_config = (
            custom_model_config(self.model, ds, str(self.device))
            if self._user_model is not None
            else self.model.config
        )
        if self.is_main:
            write_run_config(
                self.run_dir,
                cfg.to_dict(),
                self.model_config,
                self.dataset,
                self.splits(),
                environment=environment(str(self.device), self.threads()),
            )
        if self.resume:
            self._restore()

    def _build_criterion(self) -> torch.nn.Module:
        """The loss of a step: the triplet loss, inside a cross-batch memory if asked."""
        cfg = self.cfg
        loss: torch.nn.Module = self.loss_fn
        if (self.dist is not None or cfg.memory_size > 0) and not isinstance(loss, TripletLoss):
            raise InputError(
                "--distributed and --memory-size need tripletlab's TripletLoss (a custom loss "
                "cannot be mined over gathered batches or a memory)"
            )
        if self.dist is not None:  # own anchors x the gathered global batch
            loss = DistributedTripletLoss(self.loss_fn, scale_for_ddp=True)
        if cfg.memory_size <= 0:
            return loss
        batch = cfg.p * cfg.k
        if cfg.memory_size < batch:
            raise InputError(
                f"--memory-size {cfg.memory_size} is smaller than the batch (P*K = {batch}): "
                f"use at least {batch} (a few batches, e.g. {8 * batch}), or 0 for no memory"
            )
        if cfg.memory_warmup < 0:
            raise InputError(f"--memory-warmup must be >= 0, got {cfg.memory_warmup}")
        return CrossBatchMemory(
            loss,
            size=cfg.memory_size,
            embedding_dim=cfg.embedding_dim,
            start_after=cfg.memory_warmup,
        ).to(self.device)

    def _step_stats(self) -> dict:
        """Stats of the last step's batch (plus the memory's, prefixed ``memory_``)."""
        if isinstance(getattr(self, "criterion", None), CrossBatchMemory):
            mem = self.criterion.memory_stats
            extra = {f"memory_{k}": mem[k] for k in ("active_fraction", "n_triplets") if k in mem}
            return {**self.criterion.batch_stats, **extra}
        return dict(getattr(self.criterion, "stats", {}))

    def _is_text(self) -> bool:
        return self.train_set.kind in ("text", "triplets")

    def _lr(self) -> float:
        """``cfg.lr``, or its default: 1e-3, 3e-4 when fine-tuning an image backbone (1e-3
        overfits AT&T's validation identities within 50 steps), 2e-5 for a pretrained text
        encoder."""
        if self.cfg.lr is not None:
            return self.cfg.lr
        return 2e-5 if self._is_text() else 3e-4 if self.cfg.backbone else 1e-3

    def _epochs(self) -> int:
        """``cfg.epochs``, or its default: 20, and 1 for a pretrained text encoder."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        return 1 if self._is_text() else 20

    def _build_text_model(self) -> torch.nn.Module:
        """A pretrained text encoder (``--model minilm`` or a folder); its config.json and
        tokenizer are written to RUN/encoder so the run rebuilds it offline."""
        from .models.text import ENCODER_DIR, build_text_encoder

        cfg = self.cfg
        mcfg = {"name": "text", "encoder": cfg.model or "minilm", **cfg.model_options}
        model = build_text_encoder(mcfg).to(self.device)
        model.save_encoder_files(self.run_dir / ENCODER_DIR)
        ds = self.dataset
        texts = (
            ds.texts
            if isinstance(ds, Dataset)
            else [t for part in (ds.anchors, ds.positives, ds.negatives) for t in part]
        )
        n_long = model.count_too_long(texts)
        ds.info["texts_truncated"] = n_long
        if n_long:
            self.log(
                f"note: {n_long} of {len(texts)} texts are longer than {model.max_length} "
                "tokens and are truncated"
            )
        return model

    # ---------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        if not self.is_main:
            return
        tensors = {f"model.{k}": v.detach().cpu() for k, v in self.model.state_dict().items()}
        tensors["rng.torch"] = torch.get_rng_state()
        if self.augment is not None:
            tensors["rng.augment"] = self.augment.get_state()
        if getattr(self.loss_fn, "generator", None) is not None:
            tensors["rng.loss"] = self.loss_fn.generator.get_state()
        if isinstance(getattr(self, "criterion", None), CrossBatchMemory):
            for k, v in self.criterion.state_dict().items():
                tensors[f"memory.{k}"] = v.detach().cpu().contiguous()
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
            "train_time_s": self._train_seconds(),
        }
        save_checkpoint(self.run_dir, tensors, self.opt.state_dict(), state)
        self._ckpt_step = st.step

    def _train_seconds(self) -> float:
        """Training time of this run so far, over every session (resumes add up)."""
        start = getattr(self, "_t_start", None)
        return self._time_before + (time.perf_counter() - start if start is not None else 0.0)

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
        if getattr(self.loss_fn, "generator", None) is not None and "rng.loss" in tensors:
            self.loss_fn.generator.set_state(tensors["rng.loss"])
        if isinstance(getattr(self, "criterion", None), CrossBatchMemory):
            mem = {k[7:]: v for k, v in tensors.items() if k.startswith("memory.")}
            if not mem:
                raise FileFormatError(
                    f"checkpoint in {self.run_dir} has no cross-batch memory but the run uses "
                    "--memory-size; resume with the run's own config.json"
                )
            self.criterion.load_state_dict(mem)
        (self.stream or self.sampler).load_state_dict(state["sampler"])
        st = self.state
        st.step, st.best, st.best_step = state["step"], state["best"], state["best_step"]
        st.evals_without_improvement = state["evals_without_improvement"]
        st.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self._time_before = float(state.get("train_time_s", 0.0))
        self._ckpt_step = st.step
        if st.step > self.total_steps:
            raise InputError(
                f"{self.run_dir} is at step {st.step}; to extend it pass --steps greater than "
                f"{st.step} (got {self.total_steps})"
            )
        if self.is_main:
            trim_metrics(self.run_dir, st.step)  # later lines will be produced again
        saved_total = state.get("total_steps", self.total_steps)
        extended = f" (extended from {saved_total})" if self.total_steps != saved_total else ""
        self.log(f"resumed {self.run_dir} at step {st.step}/{self.total_steps}{extended}")

    def _save_best(self) -> None:
        if not self.is_main:
            return
        save_weights(self.run_dir / "model.safetensors", self.model.state_dict())

    # ---------------------------------------------------------------- one step
    def _batches(self):
        """Training batches: index lists (in memory) or ``(x, y)`` from the image stream."""
        if self.stream is None:
            yield from self.sampler
            return
        while True:
            x, y, _ = next(self.stream)
            yield x, y

    def _train_step(self, idx) -> tuple[float, dict]:
        """Augment, embed, mine + loss, backward, clip, update; non-finite values handled.
        ``idx``: indices into the in-memory training set, or a streamed ``(x, y)`` batch."""
        cfg = self.cfg
        if isinstance(idx, tuple):  # streamed (already augmented) batch
            x, y = idx[0].to(self.device, non_blocking=True), idx[1].to(self.device)
        else:
            x = self.train_set.inputs(idx)
            x = x.to(self.device) if torch.is_tensor(x) else x  # text: a list of strings
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
        if any_rank(not bool(torch.isfinite(emb).all())):  # every rank takes the same branch
            return self._nonfinite("embeddings")
        loss = self.criterion(emb, y)
        stats = self._step_stats()
        if not bool(torch.isfinite(loss)):
            return self._nonfinite("loss")
        if self.scaler is not None:  # float16 on CUDA
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        else:
            loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.norm() for g in grads])).all()):
            if self.scaler is not None:  # the scaler lowers its scale and skips the update
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

    def _nonfinite(self, what: str) -> tuple[float, dict]:
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

    # ---------------------------------------------------------------- after a step
    def _due(self, every: int) -> bool:
        return self.state.step % every == 0 or self.state.step == self.total_steps

    def _log_step(self, loss: float, stats: dict) -> None:
        """Every ``log_every`` steps: one metrics.jsonl line and the progress-bar text."""
        if not self._due(self.cfg.log_every) or not self.is_main:
            return
        now = time.perf_counter()
        rec = {
            "step": self.state.step,
            "epoch": self.sampler.epoch,
            "loss": loss,
            "lr": self.sched.get_last_lr()[0],
            "samples_per_s": self._seen / max(now - self._t_log, 1e-9),
            **{k: stats[k] for k in _LOGGED_STATS if k in stats},
        }
        self._record(rec)
        self._t_log, self._seen = now, 0
        self._bar.set_postfix(loss=f"{loss:.4f}", active=f"{stats.get('active_fraction', 0):.2f}")
        self._progress_line(loss, stats, now)

    def _progress_line(self, loss: float, stats: dict, now: float) -> None:
        """Without a progress bar (stderr not a terminal) and not quiet: one line on stderr at
        the first logged step, then every ``progress_every`` seconds, and at the last step."""
        st, cfg = self.state, self.cfg
        if not self._lines or (
            st.step != self.total_steps
            and self._t_line is not None
            and now - self._t_line < cfg.progress_every
        ):
            return
        self._t_line = now
        done = st.step - self._first_step
        elapsed = now - self._t_start
        eta = elapsed / done * (self.total_steps - st.step) if done else float("nan")
        rate = self._throughput()
        print(
            f"step {st.step}/{self.total_steps} ({100 * st.step / self.total_steps:.0f}%)  "
            f"loss {loss:.4f}  active {stats.get('active_fraction', float('nan')):.2f}  "
            f"{rate or 0:.0f} samples/s  elapsed {_clock(elapsed)}  ETA {_clock(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def _record(self, rec: dict) -> None:
        """One metrics.jsonl line, and the same scalars in TensorBoard (``--tensorboard``:
        ``train/<key>`` per logged step, ``val/<metric>`` per validation)."""
        append_metrics(self.run_dir, rec)
        if self._tb is not None:
            group = "val" if rec.get("type") == "eval" else "train"
            for key, value in rec.items():
                if key not in ("step", "type") and isinstance(value, (int, float)):
                    if math.isfinite(value):
                        self._tb.add_scalar(f"{group}/{key}", value, rec["step"])

    def _open_tensorboard(self) -> None:
        if self.cfg.tensorboard and self._tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint
            self._tb = SummaryWriter(
                str(self.run_dir / "tensorboard"), purge_step=self.state.step or None
            )

    def _close_tensorboard(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def embed_split(self, part: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a split (streamed from disk when the images are)."""
        if self.files is None:
            emb = embed(self.model, part.inputs(), self.cfg.eval_batch_size, self.device, self.amp)
            return emb, part.y
        from .imagerun import embed_part

        return embed_part(self, part)

    def validate(self) -> dict | None:
        """Retrieval metrics of the validation split (None without one)."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        emb, labels = self.embed_split(self.val_set)
        try:
            return retrieval_metrics(
                emb, labels, ks=(1, 4), nmi=False, distance=eval_distance(self.model_config)
            )
        except InputError:
            return None

    def _maybe_validate(self) -> bool:
        """Every ``eval_every`` steps: validate, keep the best model; True = stop early."""
        if not self._due(self.eval_every):
            return False
        if self.dist is not None:  # rank 0 validates and decides; the others follow
            return broadcast_flag(self._validate_and_decide() if self.is_main else False)
        return self._validate_and_decide()

    def _validate_and_decide(self) -> bool:
        st, patience = self.state, self.cfg.patience
        m = self.validate()
        if m is None:  # no validation: the latest model is the one kept
            self._save_best()
            return False
        self._record({"step": st.step, "type": "eval", **{k: m[k] for k in self.val_metrics}})
        if self.on_validate is not None:
            self.on_validate(st.step, m)
        if m[self.selection_metric] > st.best:
            st.best, st.best_step = m[self.selection_metric], st.step
            st.evals_without_improvement = 0
            self._save_best()
            return False
        st.evals_without_improvement += 1
        if patience and st.evals_without_improvement >= patience:
            self.log(
                f"early stopping at step {st.step}: no {self.selection_metric} improvement in "
                f"{patience} evaluations"
            )
            return True
        return False

    def _maybe_checkpoint(self, stop: bool) -> None:
        if self._due(self.ckpt_every) or stop:
            self._save()

    # ---------------------------------------------------------------- the loop
    def threads(self) -> int | None:
        """CPU threads for this run (None: torch's setting). ``cfg.threads`` when given; 1 for
        vector data (a small MLP step gains nothing from more threads and slows down badly on
        a busy machine); for images the faster of one thread and torch's default, measured on
        a few steps of a copy of the model at the start (:meth:`_measure_threads`), reused on
        resume."""
        if not hasattr(self, "_threads"):
            self._threads = self._choose_threads()
        return self._threads

    def _choose_threads(self) -> int | None:
        cfg = self.cfg
        if cfg.threads:
            return cfg.threads
        if self.device.type != "cpu":
            return None
        kind = getattr(self.train_set, "kind", None)
        if kind == "vector":
            return 1
        if kind != "image":  # text encoders: torch's default
            return None
        if self.resume and (self.run_dir / "config.json").exists():
            env = read_json(self.run_dir / "config.json", "run config").get("environment") or {}
            if isinstance(env.get("threads"), int) and env["threads"] >= 1:
                return env["threads"]
        return self._measure_threads()

    def _measure_threads(self, steps: int = 2) -> int | None:
        """Time forward + backward of one PK-sized batch on a copy of the model (training state
        and random streams untouched) with torch's default threads and with one; the default
        must be more than 10% faster to be used (a busy machine often makes it slower)."""
        many = torch.get_num_threads()
        if many <= 1:
            return 1
        try:
            model = copy.deepcopy(self.model).train()
        except Exception:  # noqa: BLE001 - a module that cannot be copied: torch's default
            return None
        n = self.sampler.p * self.sampler.k
        if self.files is not None:  # streamed images: a batch of their shape
            x = torch.rand(n, *self.files.input_shape, device=self.device)
        else:
            x = self.train_set.x[:n].to(self.device)

        def seconds(n: int) -> float:
            torch.set_num_threads(n)
            best = float("inf")
            with torch.random.fork_rng(devices=[]):
                for i in range(steps + 1):
                    t = time.perf_counter()
                    model(x).square().sum().backward()
                    if i:  # the first pass warms up
                        best = min(best, time.perf_counter() - t)
            return best

        try:
            t_many, t_one = seconds(many), seconds(1)
        finally:
            torch.set_num_threads(many)
        choice = 1 if t_one <= 1.1 * t_many else many
        self.log(
            f"threads: {choice} (a step took {t_many:.3f} s with {many} threads, {t_one:.3f} s "
            "with 1; --threads N sets it)"
        )
        return choice

    def fit(self) -> EvalResult:
        """Train to the configured number of steps, evaluate on the test split, return eval.

        Under ``--distributed`` every rank trains; rank 0 alone evaluates and writes files, the
        others return the training part of the result. A failed collective (another rank died
        or hung past ``--dist-timeout``) stops this rank with a message naming it.
        """
        if self.resume and self.state.step >= self.total_steps:
            return self._finished()
        previous, n = torch.get_num_threads(), self.threads()
        if n:
            torch.set_num_threads(n)
        handler = self._install_sigint()
        failed = True
        try:
            result = self._fit()
            failed = False
            return result
        except Exception as e:
            self._remove_unstarted_run()
            if self.dist is None or isinstance(e, TripletLabError):
                raise
            if not isinstance(e, (RuntimeError, OSError)):
                raise
            raise TripletLabError(
                f"rank {self.dist.rank} of {self.dist.world_size}: lost the other processes at "
                f"step {self.state.step + 1} ({type(e).__name__}: {str(e).splitlines()[0]}); "
                "another rank failed or stopped (torchrun's summary names it). The last "
                f"checkpoint in {self.run_dir / 'checkpoint'} resumes with: torchrun "
                f"--nproc_per_node N -m tripletlab train --distributed --resume {self.run_dir}"
            ) from None
        finally:
            self._close_tensorboard()
            torch.set_num_threads(previous)
            shutdown(self.dist, clean=not failed)
            if handler is not None:
                signal.signal(signal.SIGINT, handler)

    def _finished(self) -> EvalResult:
        """Resuming a run that already reached its last step: nothing is trained and eval.json
        is kept (an extension needs a larger ``steps``)."""
        self.log(
            f"{self.run_dir} already finished at step {self.state.step}; nothing to train "
            f"(extend it with --resume {self.run_dir} --steps N, N > {self.state.step})"
        )
        path = self.run_dir / "eval.json"
        if path.exists() or not self.cfg.evaluate:
            return read_json(path, "evaluation") if path.exists() else {"evaluated": False}
        self._t_start = None
        self._step_seconds, self._step_samples = 0.0, 0
        self.collapse = None
        return self.final_evaluation(self._training_result(self._train_seconds()))

    # ---------------------------------------------------------------- Ctrl-C
    def _install_sigint(self):
        """First Ctrl-C: finish the current step, save a checkpoint and stop with the resume
        command; a second one stops at once. Only in the main thread (signals need it)."""
        self._stop_requested = False
        self._in_loop = False
        if threading.current_thread() is not threading.main_thread():
            return None

        def on_sigint(signum, frame):
            if not self._in_loop or self._stop_requested:
                raise KeyboardInterrupt
            self._stop_requested = True
            print(
                "\nCtrl-C: stopping after this step and saving a checkpoint "
                "(Ctrl-C again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

        return signal.signal(signal.SIGINT, on_sigint)

    def _interrupted(self) -> TrainingInterrupted:
        st, ckpt = self.state, getattr(self, "_ckpt_step", 0)
        return TrainingInterrupted(
            f"interrupted at step {st.step}/{self.total_steps}; checkpoint at step {ckpt} in "
            f"{self.run_dir / 'checkpoint'}. Continue with:\n"
            f"  tripletlab train --resume {shlex.quote(str(self.run_dir))}",
            step=ckpt,
            run_dir=str(self.run_dir),
        )

    def _start_session(self) -> None:
        """Timers, progress bar and collapse detector of this session; the initial checkpoint."""
        from tqdm import tqdm

        cfg = self.cfg
        self.collapse: dict | None = None
        self._collapse = CollapseDetector(cfg.margin, cfg.soft_margin)
        tty = sys.stderr.isatty()
        self._lines = not cfg.quiet and not tty  # progress lines instead of a bar
        self._t_line: float | None = None
        self._first_step = self.state.step
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            disable=cfg.quiet or not tty,
            unit="step",
            dynamic_ncols=True,
        )
        self._open_tensorboard()
        self._t_start = self._t_log = time.perf_counter()
        self._seen = 0
        self._step_seconds, self._step_samples = 0.0, 0  # training steps only (throughput)
        if self.state.step == 0:
            self._save()
            if self.val_set is None:
                self._save_best()

    def _fit(self) -> EvalResult:
        self._start_session()
        self._in_loop = True
        try:
            self._loop()
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread
            raise self._interrupted() from None
        finally:
            self._in_loop = False
            self._bar.close()
        result = self._training_result(self._train_seconds())
        if not self.cfg.evaluate or not self.evaluate_test or not self.is_main:
            return {"evaluated": False, **result}
        return self.final_evaluation(result)

    def _loop(self) -> None:
        st, stop = self.state, False
        while st.step < self.total_steps and not stop:
            for idx in self._batches():
                t_step = time.perf_counter()
                loss, stats = self._train_step(idx)
                self._step_seconds += time.perf_counter() - t_step
                n_batch = len(idx[1]) if isinstance(idx, tuple) else len(idx)
                global_n = n_batch * (self.dist.world_size if self.dist else 1)
                self._step_samples += global_n
                self._seen += global_n
                st.step += 1
                self._bar.update(1)
                if "skipped" not in stats:
                    self.collapse = self._collapse.update(stats, loss, st.step) or self.collapse
                self._log_step(loss, stats)
                stop = self._maybe_validate()
                self._maybe_checkpoint(stop)
                if self._stop_requested:
                    if self._ckpt_step != st.step:
                        self._save()
                    raise self._interrupted()
                if st.step >= self.total_steps or stop:
                    break

    def _throughput(self) -> float | None:
        """Training samples per second over the optimisation steps of this session (data
        indexing, augmentation, forward, loss, backward and update; no validation)."""
        secs = getattr(self, "_step_seconds", 0.0)
        return self._step_samples / secs if secs > 0 else None

    def _training_result(self, train_time: float) -> EvalResult:
        st = self.state
        extra: dict = {"auto": self.choices} if self.choices else {}
        if self.stream is not None and self.stream.skipped:
            extra["skipped_bad_images"] = self.stream.skipped
        return {
            **extra,
            "train_time_s": train_time,
            "train_samples_per_s": self._throughput(),
            "steps": st.step,
            "best_step": st.best_step,
            "skipped_nonfinite_steps": st.skipped_nonfinite,
            "collapse": self.collapse,
        }

    def report(self) -> Path:
        """Write ``report.html`` and ``plots/`` of this run (after :meth:`fit`), also for a
        custom module and data: the report uses this trainer's model and test set."""
        from .report import build_report

        if self._user_model is None and self._user_data is None:
            return build_report(self.run_dir)
        initial = None
        if self._user_model is not None:
            initial = copy.deepcopy(self.model)
            initial.load_state_dict(self._initial_state)
        return build_report(
            self.run_dir, model=self.model, test_data=self.test_set, initial_model=initial
        )

    def _tensorboard_test(self, emb: torch.Tensor, result: EvalResult) -> None:
        """Test embeddings (with class names) for the projector and the headline test
        metrics as ``test/<metric>`` scalars at the last step."""
        names = [self.test_set.classes[int(i)] for i in self.test_set.y]
        keep = torch.arange(len(names))[:10000]  # the projector's practical limit
        self._tb.add_embedding(
            emb[keep], metadata=[names[i] for i in keep], global_step=self.state.step, tag="test"
        )
        for block in ("retrieval", "verification"):
            for key, value in (result.get(block) or {}).items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"test/{key}", value, self.state.step)

    def final_evaluation(self, result: EvalResult | float) -> EvalResult:
        """Evaluate the best model on the held-out test split; write eval.json.

        ``result``: the training part of the result (or the training time in seconds)."""
        if not isinstance(result, dict):
            result = self._training_result(float(result))
        # the best weights (model.safetensors) into this trainer's module (a custom one too)
        self.model.load_state_dict(load_weights(self.run_dir / "model.safetensors"))
        dist = eval_distance(self.model_config)
        emb, test_y = self.embed_split(self.test_set)
        best = self.state.best
        result = {"split": "test", "distance": dist, **result}
        result["best_val_map_at_r"] = best if best >= 0 else None
        calibration = None
        if self.val_set is not None and len(self.val_set) >= 2:
            # the threshold is chosen on validation pairs, never on the test pairs it is scored on
            vemb, val_y = self.embed_split(self.val_set)
            calibration = validation_threshold(vemb, val_y, dist, seed=self.cfg.seed)
        if len(test_y) >= 2:
            result.update(
                evaluate_embeddings(emb, test_y, dist, seed=self.cfg.seed, calibration=calibration)
            )
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
        if self._tb is not None:
            self._tensorboard_test(emb, result)
        atomic_write_json(self.run_dir / "eval.json", jsonable(result))
        return result
