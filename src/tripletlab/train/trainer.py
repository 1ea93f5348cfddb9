"""The training loop: :class:`Trainer` trains an embedding model with triplet loss on PK batches.

Reading order: ``Trainer.__init__`` loads and splits the data (``_prepare_data``) and builds the
model, loss, sampler and optimiser (``_build``); ``fit`` runs ``_fit``, whose loop is one
``_train_step`` per PK batch followed by ``_log_step``, ``_maybe_validate`` and
``_maybe_checkpoint``; ``final_evaluation`` evaluates the best model on the test split and writes
``eval.json``. Files of the run directory are written by :mod:`tripletlab.rundir`; metrics come
from :mod:`tripletlab.metrics.evaluate`. The building steps live in :mod:`tripletlab.train.setup`,
checkpoint save/restore in :mod:`tripletlab.train.state` and logging (metrics.jsonl, progress
lines, TensorBoard, threads) in :mod:`tripletlab.train.progress`: mixins of :class:`Trainer`.
"""

from __future__ import annotations

import copy
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from ..data import Dataset
from ..errors import (
    InputError,
    NonFiniteError,
    TrainingInterrupted,
    TripletLabError,
)
from ..inference.embed import embed
from ..losses.memory import CrossBatchMemory
from ..metrics import retrieval_metrics
from ..metrics.evaluate import (
    EvalResult,
    eval_distance,
    evaluate_embeddings,
    summary_lines,
    validation_threshold,
)
from ..rundir.files import (
    load_checkpoint,
    load_dataset_for_run,
    load_run,
    load_weights,
    model_fingerprint,
    read_json,
    save_checkpoint,
)
from ..runtime.devices import amp_dtype, autocast, grad_scaler, resolve_device
from ..runtime.process_group import DistEnv, any_rank, broadcast_flag, init_from_env, shutdown
from ..utils import atomic_write_json, jsonable
from .collapse import CollapseDetector
from .config import TrainConfig, resolve_config
from .custom import user_datasets
from .hard_class_refresh import refresh_hard_classes
from .progress import TrainerLogging
from .setup import TrainerSetup, _Running
from .state import TrainerState

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

_VAL_METRICS = ("precision_at_1", "recall_at_4", "r_precision", "map_at_r")


class Trainer(TrainerSetup, TrainerState, TrainerLogging):
    """Trains an embedding model with triplet loss on PK batches.

    Example:
        >>> from tripletlab.train.config import resolve_config
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
    def _step_stats(self) -> dict:
        """Stats of the last step's batch (plus the memory's, prefixed ``memory_``)."""
        if isinstance(getattr(self, "criterion", None), CrossBatchMemory):
            mem = self.criterion.memory_stats
            extra = {f"memory_{k}": mem[k] for k in ("active_fraction", "n_triplets") if k in mem}
            return {**self.criterion.batch_stats, **extra}
        return dict(getattr(self.criterion, "stats", {}))

    def _batches(self):
        """Training batches: index lists (in memory) or ``(x, y)`` from the image stream."""
        if self.stream is None or self.features is not None:
            it = iter(self.sampler)
            while True:
                refresh_hard_classes(self)  # every N steps (--sampler hard-class), else no-op
                batch = next(it, None)
                if batch is None:
                    return
                yield batch
        while True:
            refresh_hard_classes(self)
            x, y, _ = next(self.stream)
            yield x, y

    def _train_step(self, idx) -> tuple[float, dict]:
        """Augment, embed, mine + loss, backward, clip, update; non-finite values handled.
        ``idx``: indices into the in-memory training set, or a streamed ``(x, y)`` batch."""
        cfg = self.cfg
        forward = self.forward
        if self.features is not None:  # frozen backbone (or stages): cached features / maps
            x = self.features.batch(idx).to(self.device)
            y = self.train_set.y[idx].to(self.device)
            forward = self.features.head_input(self.model)
        elif isinstance(idx, tuple):  # streamed (already augmented) batch
            x, y = idx[0].to(self.device, non_blocking=True), idx[1].to(self.device)
        else:
            x = self.train_set.inputs(idx)
            x = x.to(self.device) if torch.is_tensor(x) else x  # text: a list of strings
            y = self.train_set.y[idx].to(self.device)
        if self.augment is not None and self.features is None:
            x = self.augment(x)
        if self.channels_last and self.features is None:
            x = x.contiguous(memory_format=torch.channels_last)
        if hasattr(self.model, "set_backbone_trainable"):  # head-only warm-up
            self.model.set_backbone_trainable(self.state.step >= cfg.head_warmup_steps)
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.amp):
            emb = forward(x)
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

    def embed_split(
        self, part: Dataset, model: torch.nn.Module | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and labels of a split (streamed from disk when the images are), by this
        trainer's model or by ``model`` (e.g. the backbone's features)."""
        model = self.model if model is None else model
        if self.files is None:
            emb = embed(model, part.inputs(), self.cfg.eval_batch_size, self.device, self.amp)
            return emb, part.y
        from .image_data import embed_part

        return embed_part(self, part, model)

    def validate(self) -> dict | None:
        """Retrieval metrics of the validation split (None without one)."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        emb = self.features.val_embeddings(self.model, self.device) if self.features else None
        if emb is not None:  # a frozen backbone: its cached features, the current head
            labels = self.val_set.y
        else:
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
        score = m[self.selection_metric]
        if score > st.best:
            st.best, st.best_step = score, st.step
            st.evals_without_improvement = 0
            self._save_best()
            return False
        if score == st.best:
            # a tie keeps the later model: a saturated metric (MAP@R 1.0 on a handful of
            # validation classes) says nothing against the steps trained since
            st.best_step = st.step
            self._save_best()
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
        self._prepare_features()
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
        if getattr(self, "_hard_class_refreshes", 0):  # this session's refreshes
            extra["hard_class_refreshes"] = self._hard_class_refreshes
            extra["hard_class_seconds"] = round(self._hard_class_seconds, 3)
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
        from ..report import build_report

        if self._user_model is None and self._user_data is None:
            return build_report(self.run_dir)
        initial = None
        if self._user_model is not None:
            initial = copy.deepcopy(self.model)
            initial.load_state_dict(self._initial_state)
        return build_report(
            self.run_dir, model=self.model, test_data=self.test_set, initial_model=initial
        )

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
