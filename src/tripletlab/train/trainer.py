"""The training loop: :class:`Trainer` trains an embedding model with triplet loss.

Reading order, top to bottom: ``__init__`` prepares the data and builds the parts
(:mod:`tripletlab.train.build`: ``task.prepare`` then ``task.build``) and the callbacks
(:mod:`tripletlab.train.callbacks`); ``fit`` caches frozen features if any, calls ``on_start``,
then per batch of ``self.batches`` (:mod:`tripletlab.train.batches`) runs ``_train_step`` and
the ``on_step`` hooks, every ``eval_every`` steps ``validate`` and the ``on_validate`` hooks;
``final_evaluation`` scores the best model on the test split (``self.evaluator``,
:mod:`tripletlab.train.evaluation`) and writes ``eval.json``; ``on_end`` closes. Checkpoints:
:mod:`tripletlab.train.checkpoint`.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import torch

from ..data import Dataset
from ..data.open import data_sources
from ..errors import InputError, NonFiniteError, TrainingInterrupted, TripletLabError
from ..inference.embed import embed
from ..metrics.evaluate import EvalResult
from ..rundir.environment import environment
from ..rundir.files import read_json, write_run_config
from ..runtime.devices import amp_dtype, grad_scaler, resolve_device
from ..runtime.process_group import DistEnv, init_from_env, shutdown
from ..utils import atomic_write_json, jsonable
from . import checkpoint, robust
from .batches import Batch, CachedFeatureBatches
from .build import LABELLED_DATA, Context, Task, choose_threads, frozen_features
from .callbacks import (
    STOP,
    BestModel,
    Checkpointing,
    CollapseWatch,
    HardClassRefresh,
    IdleWatch,
    MetricsLog,
    TensorBoard,
)
from .config import TrainConfig, resolve_config
from .custom import user_datasets
from .interrupt import CtrlC, interrupted
from .step import optimisation_step

__all__ = ["STOP", "Trainer"]

_UNSET = object()


class Trainer:
    """Trains an embedding model with triplet loss on PK batches.

    ``Trainer(cfg)`` (a :class:`TrainConfig`) or ``Trainer(**options)`` (its fields), with your
    own ``model`` / ``train_data`` / ``test_data`` / ``loss`` and ``callbacks`` (see
    :mod:`tripletlab.train.callbacks`: one that stops at step 20 is its example).

    Example:
        >>> from tripletlab.train import Trainer
        >>> import tempfile
        >>> t = Trainer(data="digits", steps=20, quiet=True, report=False, threads=1,
        ...             out=tempfile.mkdtemp() + "/run", log=lambda *a: None)
        >>> result = t.fit()
        >>> result["steps"], 0 <= result["retrieval"]["map_at_r"] <= 1
        (20, True)
    """

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
        callbacks=(),
        task: Task = LABELLED_DATA,
        **options,
    ) -> None:
        if cfg is None:
            cfg = resolve_config(None, options)
        elif options:
            raise InputError(f"pass options in cfg or as keywords, not both: {sorted(options)}")
        user_data = None
        if train_data is not None:
            user_data = user_datasets(train_data, test_data)
            cfg.data = f"python:{type(train_data).__name__}"
        elif test_data is not None:
            raise InputError("test_data needs train_data")
        self.cfg, self.log, self.resume, self.task = cfg, log, resume, task
        self._custom_model, self._custom_data = model, user_data
        name = (
            "custom" if user_data else "+".join(Path(d).name or d for d in data_sources(cfg.data))
        )
        self.run_dir = Path(cfg.out or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        tensorboard = TensorBoard() if cfg.tensorboard else None  # (checks it is installed)
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
        self.state = checkpoint.LoopState()
        self.clock = checkpoint.SessionClock()
        #: False: ``fit`` stops after training (no test evaluation; model selection only)
        self.evaluate_test = True
        self.amp = amp_dtype(self.device, cfg.amp) if task.autocast else None
        self.scaler = grad_scaler(self.device, self.amp)
        self.evaluator = task.evaluator()
        self.features = None  # a frozen backbone's cached features (prepare_features)
        self._robust: dict | None = None  # the starting weights (train/robust.py)
        self.kept: dict | None = None  # which candidate robust.finish kept (eval.json)
        self.test_embeddings: torch.Tensor | None = None  # of the final evaluation
        self.stopping = False  # a callback returned STOP (or Ctrl-C): no step follows
        self.last_batch_samples = 0  # items of the last step's batch, over all ranks
        self._checkpoint_step = 0
        self._threads = _UNSET
        self._ctrl_c = CtrlC(on_request=self._stop_after_step)
        ctx = Context(self.run_dir, self.device, self.dist, resume, log, model, loss, user_data)
        try:
            d, self.defaults = task.prepare(cfg, ctx)
            self.data = d  # the Splits
            self.parts = p = task.build(cfg, d, self.defaults, ctx)
            self.dataset, self.files, self.choices = d.dataset, d.files, self.defaults.notes
            self.train_set, self.val_set, self.test_set = d.train, d.val, d.test
            self.train_full, self.test_info = d.train_full, d.test_info
            self.model, self.model_config, self.forward = p.model, p.model_config, p.forward
            self.loss_fn, self.criterion, self.augment = p.loss_fn, p.criterion, p.augment
            self.sampler, self.stream, self.batches = p.sampler, p.stream, p.batches
            self.opt, self.sched, self.channels_last = p.optimizer, p.scheduler, p.channels_last
            self.total_steps, self.eval_every = p.total_steps, p.eval_every
            self.ckpt_every = p.checkpoint_every
            self.metrics_log = MetricsLog(tensorboard)
            self.collapse_watch, self.hard_classes = CollapseWatch(), HardClassRefresh()
            self.callbacks = [
                self.metrics_log,
                *([tensorboard] if tensorboard else []),
                self.collapse_watch,
                IdleWatch(),
                BestModel(cfg.patience or 0),
                *callbacks,
                Checkpointing(self.ckpt_every),  # these two act once the step is decided
                self.hard_classes,
            ]
            if self.is_main:
                self._write_config()
            if resume:
                self._restore()
        except BaseException:
            self._remove_unstarted_run()
            raise

    def _stop_after_step(self) -> None:
        self.stopping = True

    @classmethod
    def from_config(cls, cfg: TrainConfig, **kwargs) -> Trainer:
        """The same as ``Trainer(cfg, **kwargs)``."""
        return cls(cfg, **kwargs)

    def _remove_unstarted_run(self) -> None:
        if self.is_main and self._created_dir and self.state.step == 0:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def splits(self) -> dict:
        """The train / val / test data sets of this run (val None without validation)."""
        return {"train": self.train_set, "test": self.test_set, "val": self.val_set}

    def threads(self) -> int | None:
        """CPU threads for this run (None: torch's setting; :func:`.build.choose_threads`)."""
        if self._threads is _UNSET:
            self._threads = choose_threads(
                self.cfg, self.device, self.data, self.parts, self.run_dir, self.resume, self.log
            )
        return self._threads

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
        self._ctrl_c.install()
        result = None
        try:
            result = self._fit()
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
            for cb in self.callbacks:
                if hasattr(cb, "on_end"):
                    cb.on_end(self, result)
            torch.set_num_threads(previous)
            shutdown(self.dist, clean=result is not None)
            self._ctrl_c.restore()

    def _fit(self) -> EvalResult:
        self.prepare_features()
        self._robust = robust.begin(self, fresh=self.state.step == 0 and not self.resume)
        self.clock = checkpoint.SessionClock(time.perf_counter(), before=self.clock.before)
        self.stopping = False
        self._hooks("on_start")
        self._ctrl_c.armed = True
        try:
            self._loop()
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread
            raise self._interrupted() from None
        finally:
            self._ctrl_c.armed = False
        if self.is_main:  # the guard and WiSE-FT: the best candidate on validation is kept
            self.kept = robust.finish(self, self._robust)
        result = self._training_result()
        if not self.cfg.evaluate or not self.evaluate_test or not self.is_main:
            return {"evaluated": False, **result}
        return self.final_evaluation(result)

    def _loop(self) -> None:
        st, world = self.state, self.dist.world_size if self.dist else 1
        while st.step < self.total_steps and not self.stopping:
            batches = iter(self.batches)  # one epoch (a stream: endless)
            while st.step < self.total_steps and not self.stopping:
                t_step = time.perf_counter()
                batch = next(batches, None)
                if batch is None:
                    break
                loss, stats = self._train_step(batch)
                self.clock.step_seconds += time.perf_counter() - t_step
                self.last_batch_samples = batch.size * world
                self.clock.step_samples += self.last_batch_samples
                st.step += 1
                self._hooks("on_step", st.step, loss, stats)
                if self.due(self.eval_every):
                    self._hooks("on_validate", st.step, self._validation())
        if self._ctrl_c.requested:  # stopped after a step
            if self._checkpoint_step != st.step:
                self.save_checkpoint()
            raise self._interrupted()

    def _interrupted(self) -> TrainingInterrupted:
        st = self.state
        return interrupted(self.run_dir, st.step, self.total_steps, self._checkpoint_step)

    def _hooks(self, hook: str, *args) -> None:
        """Call ``hook`` of every callback in order; a STOP sets ``stopping``."""
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None and method(self, *args) == STOP:
                self.stopping = True

    def due(self, every: int) -> bool:
        """True at every ``every``-th step and at the last one."""
        return self.state.step % every == 0 or self.state.step == self.total_steps

    def _validation(self) -> dict | None:
        """Rank 0 validates; under ``--distributed`` the other ranks receive its metrics (so
        every rank's callbacks decide alike)."""
        metrics = self.validate() if self.is_main else None
        if self.dist is not None:
            import torch.distributed as dist

            box = [metrics]
            dist.broadcast_object_list(box, src=0, device=self.device)
            metrics = box[0]
        return metrics

    def _train_step(self, batch: Batch) -> tuple[float, dict]:
        """One optimisation step (:func:`.step.optimisation_step`); non-finite values skipped
        (``--skip-nonfinite``) or an error."""
        if hasattr(self.model, "set_backbone_trainable"):  # head-only warm-up
            self.model.set_backbone_trainable(self.state.step >= self.cfg.head_warmup_steps)
        anchor = self._robust["start"] if self._robust and self._robust["anchor"] else None
        penalty = (
            (lambda: robust.l2sp_penalty(self.model, anchor, self.cfg.anchor_weights))
            if anchor is not None
            else None
        )
        if self.cfg.chunk_size == "auto" and self.features is None:
            self._choose_chunk_size(batch)
        out = optimisation_step(
            batch, self.batches.forward(self.forward), self.model, self.criterion,
            self.opt, self.sched, self.scaler, self.amp, self.device, self.cfg.grad_clip,
            penalty, None if self.features is not None else self.cfg.chunk_size,
        )  # fmt: skip
        if out.nonfinite is not None:
            return self._nonfinite(out.nonfinite)
        return out.loss, out.stats

    def _choose_chunk_size(self, batch: Batch) -> None:
        """``--chunk-size auto``, at the first step of a run: the chunk size chosen by
        :func:`~tripletlab.losses.chunk_choice.choose_chunk_size` on this batch (a probe of 8
        and 16 of its items; the random state and the buffers are put back, so the step is
        the one an explicit ``--chunk-size`` would take), the smallest over the ranks under
        ``--distributed``. It is printed as ``auto:``, kept in eval.json's ``auto`` list and
        written into config.json (``chunk_size``: the number, or null for off), so a resumed
        run uses the same one."""
        from ..losses.chunk_choice import choose_chunk_size
        from ..losses.gradient_cache import batch_length

        n = batch_length(batch.x)
        warmup = hasattr(self.model, "set_backbone_trainable")
        if warmup:  # a head-only warm-up step: measure what the fine-tuning steps will hold
            self.model.set_backbone_trainable(True)
        try:
            choice = choose_chunk_size(  # the module itself: not its DDP or compiled wrapper
                self.batches.forward(self.model), batch.x, n, module=self.model, amp=self.amp
            )
        finally:
            if warmup:
                self.model.set_backbone_trainable(self.state.step >= self.cfg.head_warmup_steps)
        chunk, line = choice.chunk_size, choice.line()
        if self.dist is not None:  # one chunk size on every rank: the smallest
            import torch.distributed as dist

            t = torch.tensor([n if chunk is None else chunk], device=self.device)
            dist.all_reduce(t, op=dist.ReduceOp.MIN)
            agreed = None if int(t.item()) >= n else int(t.item())
            if agreed != chunk:
                line += f"; {agreed or 'off'}, the smallest choice over the ranks"
            chunk = agreed
        self.cfg.chunk_size = chunk
        self.choices.append(line)
        if self.is_main:
            self.log(f"auto: {line}")
            if chunk is not None:
                self.log(f"gradient caching: the batch of {n} embedded {chunk} at a time")
            self._write_config()

    def _write_config(self) -> None:
        env = environment(str(self.device), self.threads())
        write_run_config(
            self.run_dir, self.cfg.to_dict(), self.model_config, self.dataset, self.splits(), env
        )

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
        return self.final_evaluation(self._training_result())

    def _training_result(self, train_time: float | None = None) -> EvalResult:
        st = self.state
        extra: dict = {"auto": self.choices} if self.choices else {}
        if self.parts.whitening is not None:
            extra["whitening"] = self.parts.whitening
        if self.kept is not None:
            extra["kept"] = self.kept
        if self.stream is not None and self.stream.skipped:
            extra["skipped_bad_images"] = self.stream.skipped
        if self.features is not None and getattr(self.features, "views", None) is not None:
            extra["cached_views"] = self.features.n_views  # --cached-views: views cached
        if self.hard_classes.refreshes:  # this session's refreshes
            extra["hard_class_refreshes"] = self.hard_classes.refreshes
            extra["hard_class_seconds"] = round(self.hard_classes.seconds, 3)
        return {
            **extra,
            "train_time_s": self.clock.train_seconds() if train_time is None else train_time,
            "train_samples_per_s": self.clock.throughput(),
            "steps": st.step,
            "best_step": st.best_step,
            "skipped_nonfinite_steps": st.skipped_nonfinite,
            "collapse": self.collapse_watch.found,
        }

    # ---------------------------------------------------------------- checkpoints
    def _stateful(self) -> dict:
        return checkpoint.stateful_tensors(self.model, self.augment, self.loss_fn, self.criterion)

    def save_checkpoint(self) -> None:
        """Write RUN/checkpoint (rank 0): the loop state and every stateful part; under
        ``--distributed`` every rank calls it and rank 0 saves each rank's own random
        streams, memory and batches state too (:func:`.checkpoint.rank_parts`)."""
        ranks = None
        if self.dist is not None:
            import torch.distributed as dist

            mine = checkpoint.rank_parts(self._stateful(), self.batches)
            ranks = [None] * self.dist.world_size
            dist.all_gather_object(ranks, mine)
        if not self.is_main:
            self._checkpoint_step = self.state.step
            return
        state = checkpoint.loop_json(
            self.state,
            self.batches.state_dict(),
            self.sched.state_dict(),
            self.total_steps,
            self.clock.train_seconds(),
        )
        checkpoint.save(self.run_dir, self._stateful(), self.opt, state, ranks)
        self._checkpoint_step = self.state.step

    def _restore(self) -> None:
        self.clock.before = checkpoint.resume(
            self.run_dir, self._stateful(), self.opt, self.sched, self.batches, self.state,
            self.total_steps, self.is_main, self.log,
            self.dist.rank if self.dist else 0, self.dist.world_size if self.dist else 1,
        )  # fmt: skip
        self._checkpoint_step = self.state.step

    # ---------------------------------------------------------------- embeddings, evaluation
    def prepare_features(self) -> None:
        """A frozen backbone: cache its features and train on them (``self.features``,
        ``self.batches``); see :func:`.build.frozen_features`."""
        fresh = self.state.step == 0 and not self.resume
        self.features = frozen_features(
            self.cfg, self.model, self.data, self.parts, self.embed_split, fresh, self.log,
            score=self.validation_score,
        )  # fmt: skip
        chunk, batch = self.cfg.chunk_size, self.cfg.p * self.cfg.k
        world = self.dist.world_size if self.dist else 1
        local = (
            f"this rank's {batch // world} of the P*K = {batch}" if world > 1 else f"P*K = {batch}"
        )
        if chunk is not None and chunk != "auto" and self.features is None and self.is_main:
            if self.task is LABELLED_DATA and chunk >= batch // world:
                self.log(f"note: --chunk-size {chunk} >= the batch ({local}): no caching")
            elif self.task is LABELLED_DATA:
                self.log(f"gradient caching: the batch ({local}) embedded {chunk} at a time")
        if self.features is not None:
            if self.cfg.chunk_size is not None and self.is_main:
                self.log(
                    f"note: --chunk-size {self.cfg.chunk_size} ignored: with the frozen-feature "
                    "cache only the head trains, on cached features, and a batch fits without "
                    "gradient caching"
                )
            y = self.train_set.y
            self.batches = CachedFeatureBatches(
                self.sampler, self.features, y, self.device, self.model
            )

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
        """Validation metrics of the current model (None without a validation split)."""
        return self.evaluator.validate(self)

    def validation_score(self, features=_UNSET) -> float | None:
        """The selection metric of the current model on validation (None without one);
        ``features``: the frozen-feature cache to validate with instead of ``self.features``."""
        kept = self.features
        if features is not _UNSET:
            self.features = features
        try:
            metrics = self.validate()
        finally:
            self.features = kept
        return None if metrics is None else metrics[self.evaluator.selection_metric]

    def final_evaluation(self, result: EvalResult | float) -> EvalResult:
        """Evaluate the best model on the held-out test split; write eval.json.

        ``result``: the training part of the result (or the training time in seconds)."""
        if not isinstance(result, dict):
            result = self._training_result(float(result))
        result, self.test_embeddings = self.evaluator.test(self, result)
        atomic_write_json(self.run_dir / "eval.json", jsonable(result))
        return result

    def report(self) -> Path:
        """Write ``report.html`` and ``plots/`` of this run (after :meth:`fit`), also for a
        custom module and data: the report uses this trainer's model and test set."""
        from ..report import build_report

        # its progress lines go where the trainer's notes go (nowhere with quiet)
        say = (lambda _line: None) if self.cfg.quiet else self.log
        if self._custom_model is None and self._custom_data is None:
            return build_report(self.run_dir, log=say)
        initial = None
        if self._custom_model is not None:
            initial = copy.deepcopy(self.model)
            initial.load_state_dict(self.parts.initial_state)
        return build_report(
            self.run_dir, model=self.model, test_data=self.test_set, initial_model=initial, log=say
        )
