"""What happens around the training steps of a :class:`~tripletlab.train.Trainer`: callbacks.

A callback has up to four methods (each optional), called in the order of the trainer's list:

- ``on_start(trainer)``: before the first step of this session (after a resume too);
- ``on_step(trainer, step, loss, stats)``: after each optimisation step (``step`` counts from 1;
  ``stats``: the loss's batch statistics, ``{"skipped": why}`` for a skipped step);
- ``on_validate(trainer, step, metrics)``: after each validation (every ``eval_every`` steps),
  ``metrics`` None when nothing could be validated (no validation split);
- ``on_end(trainer, result)``: once, with the result of ``fit`` (None when it failed).

Returning :data:`STOP` from ``on_step`` or ``on_validate`` stops training after this step (a
checkpoint is saved); the trainer's ``stopping`` is True from then on (also after a Ctrl-C).
The trainer's own behaviour is built from the callbacks below: :class:`MetricsLog`
(metrics.jsonl and the progress bar / lines), :class:`TensorBoard`, :class:`CollapseWatch`,
:class:`BestModel` (model selection and early stopping), :class:`Checkpointing` and
:class:`HardClassRefresh`; the callbacks passed as ``Trainer(callbacks=[...])`` run after
the trainer's logging, collapse watch and model selection and before its checkpointing (so a
checkpoint sees their decision).

Example: a callback that records validation scores and stops training at step 20:

    >>> from tripletlab.train import Trainer
    >>> class StopAt:
    ...     def __init__(self, step):
    ...         self.step, self.seen = step, []
    ...     def on_validate(self, trainer, step, metrics):
    ...         self.seen.append((step, round(metrics["map_at_r"], 3)))
    ...         return STOP if step >= self.step else None
    >>> import tempfile
    >>> stop = StopAt(20)
    >>> trainer = Trainer(data="digits", steps=100, eval_every=10, quiet=True, report=False,
    ...                   threads=1, out=tempfile.mkdtemp() + "/run", callbacks=[stop],
    ...                   log=lambda *a: None)
    >>> result = trainer.fit()
    >>> trainer.state.step, [step for step, _ in stop.seen]
    (20, [10, 20])
"""

from __future__ import annotations

import math
import sys
import time
from typing import Protocol

import torch

from ..errors import missing_dependency
from ..rundir.files import append_metrics, save_weights
from .collapse import CollapseDetector
from .hard_class_refresh import refresh_hard_classes

__all__ = [
    "STOP",
    "BestModel",
    "Callback",
    "Checkpointing",
    "CollapseWatch",
    "HardClassRefresh",
    "IdleWatch",
    "MetricsLog",
    "TensorBoard",
]

#: returned by ``on_step`` / ``on_validate``: stop training after this step
STOP = "stop"

LOGGED_STATS = (
    "active_fraction",
    "mean_d_ap",
    "mean_d_an",
    "mean_distance",
    "n_triplets",
    "memory_active_fraction",
    "memory_n_triplets",
)


class Callback(Protocol):
    """The hooks a callback may define (all optional; see the module docstring)."""

    def on_start(self, trainer) -> None: ...

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> str | None: ...

    def on_validate(self, trainer, step: int, metrics: dict | None) -> str | None: ...

    def on_end(self, trainer, result: dict | None) -> None: ...


def clock(seconds: float) -> str:
    """``h:mm:ss`` / ``m:ss`` of a duration ('?' when unknown).

    >>> clock(75), clock(3725), clock(float("nan"))
    ('1:15', '1:02:05', '?')
    """
    if not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TensorBoard:
    """``--tensorboard``: the scalars of metrics.jsonl (``train/<key>``, ``val/<metric>``), and
    at the end the test embeddings (projector) and ``test/<metric>`` scalars."""

    def __init__(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise missing_dependency("tensorboard", "--tensorboard") from None
        self.writer = None

    def on_start(self, trainer) -> None:
        if trainer.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint
            self.writer = SummaryWriter(
                str(trainer.run_dir / "tensorboard"), purge_step=trainer.state.step or None
            )

    def scalars(self, rec: dict) -> None:
        """The numbers of one metrics.jsonl record."""
        if self.writer is None:
            return
        group = "val" if rec.get("type") == "eval" else "train"
        for key, value in rec.items():
            if key not in ("step", "type") and isinstance(value, (int, float)):
                if math.isfinite(value):
                    self.writer.add_scalar(f"{group}/{key}", value, rec["step"])

    def on_end(self, trainer, result: dict | None) -> None:
        if self.writer is None:
            return
        emb, test = trainer.test_embeddings, trainer.test_set
        if result is not None and emb is not None:
            names = [test.classes[int(i)] for i in test.y]
            keep = torch.arange(len(names))[:10000]  # the projector's practical limit
            step = trainer.state.step
            self.writer.add_embedding(
                emb[keep], metadata=[names[i] for i in keep], global_step=step, tag="test"
            )
            for block in ("retrieval", "verification"):
                for key, value in (result.get(block) or {}).items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.writer.add_scalar(f"test/{key}", value, step)
        self.writer.close()
        self.writer = None


class MetricsLog:
    """metrics.jsonl (a line every ``log_every`` steps and per validation; rank 0), the progress
    bar on a terminal, else (not ``quiet``) a progress line on stderr every ``progress_every``
    seconds. ``tensorboard``: the :class:`TensorBoard` callback that mirrors the records."""

    def __init__(self, tensorboard: TensorBoard | None = None) -> None:
        self.tensorboard = tensorboard
        self.bar = None
        self.lines = False  # progress lines instead of a bar
        self.t_line: float | None = None
        self.t_log = 0.0
        self.seen = 0  # samples since the last logged step
        self.first_step = 0

    def record(self, trainer, rec: dict) -> None:
        append_metrics(trainer.run_dir, rec)
        if self.tensorboard is not None:
            self.tensorboard.scalars(rec)

    def on_start(self, trainer) -> None:
        from tqdm import tqdm

        cfg, tty = trainer.cfg, sys.stderr.isatty()
        self.lines = not cfg.quiet and not tty
        self.t_line, self.first_step = None, trainer.state.step
        self.bar = tqdm(
            total=trainer.total_steps,
            initial=trainer.state.step,
            disable=cfg.quiet or not tty,
            unit="step",
            dynamic_ncols=True,
        )
        self.t_log, self.seen = time.perf_counter(), 0

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> None:
        self.seen += trainer.last_batch_samples
        self.bar.update(1)
        if not trainer.due(trainer.cfg.log_every) or not trainer.is_main:
            return
        now = time.perf_counter()
        rec = {
            "step": step,
            "epoch": trainer.batches.epoch,
            "loss": loss,
            "lr": trainer.sched.get_last_lr()[0],
            "samples_per_s": self.seen / max(now - self.t_log, 1e-9),
            **{k: stats[k] for k in LOGGED_STATS if k in stats},
        }
        self.record(trainer, rec)
        self.t_log, self.seen = now, 0
        self.bar.set_postfix(loss=f"{loss:.4f}", active=f"{stats.get('active_fraction', 0):.2f}")
        self._progress_line(trainer, loss, stats, now)

    def _progress_line(self, trainer, loss: float, stats: dict, now: float) -> None:
        step, total = trainer.state.step, trainer.total_steps
        if not self.lines or (
            step != total
            and self.t_line is not None
            and now - self.t_line < trainer.cfg.progress_every
        ):
            return
        self.t_line = now
        done = step - self.first_step
        elapsed = now - trainer.clock.start
        eta = elapsed / done * (total - step) if done else float("nan")
        rate = trainer.clock.throughput()
        print(
            f"step {step}/{total} ({100 * step / total:.0f}%)  "
            f"loss {loss:.4f}  active {stats.get('active_fraction', float('nan')):.2f}  "
            f"{rate or 0:.0f} samples/s  elapsed {clock(elapsed)}  ETA {clock(eta)}",
            file=sys.stderr,
            flush=True,
        )

    def on_validate(self, trainer, step: int, metrics: dict | None) -> None:
        if metrics is not None and trainer.is_main:
            names = trainer.evaluator.val_metrics
            keep = {k: metrics[k] for k in names}
            # validation from several sources: each source's MAP@R too (evaluation.per_source)
            keep.update({k: v for k, v in metrics.items() if k.startswith("map_at_r[")})
            self.record(trainer, {"step": step, "type": "eval", **keep})

    def on_end(self, trainer, result: dict | None) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CollapseWatch:
    """Warns once when the embeddings collapse (:class:`CollapseDetector`); ``found``: the
    step and mean distance where it showed (in the result's ``collapse``)."""

    def __init__(self) -> None:
        self.detector: CollapseDetector | None = None
        self.found: dict | None = None

    def on_start(self, trainer) -> None:
        self.detector = CollapseDetector(trainer.cfg.margin, trainer.cfg.soft_margin)
        self.found = None

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> None:
        if "skipped" not in stats:
            self.found = self.detector.update(stats, loss, step) or self.found


class IdleWatch:
    """Notes once, in one line, when the loss and the active fraction have been ~0 for a long
    stretch (a tenth of the run, at least 50 steps): the batches no longer teach anything and
    the remaining steps are likely wasted (early stopping, --patience, ends such runs). "~0":
    their moving averages (over ~10 steps) below 1e-3 and 2%, so a stray active batch does not
    restart the stretch.

    Example:
        >>> w = IdleWatch(); w.on_start(type("T", (), {"total_steps": 100})())
        >>> [w.on_step(None, s, 0.0, {"active_fraction": 0.0}) for s in range(1, 50)][-1] is None
        True
        >>> w.since, w.noted
        (1, False)
    """

    def __init__(self, loss_eps: float = 1e-3, active_eps: float = 0.02) -> None:
        self.loss_eps, self.active_eps = loss_eps, active_eps
        self.since: int | None = None
        self.noted = False
        self.stretch = 50
        self.loss_avg: float | None = None
        self.active_avg = 1.0

    def on_start(self, trainer) -> None:
        self.stretch = max(50, int(getattr(trainer, "total_steps", 0) or 0) // 10)

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> None:
        if "skipped" in stats or not math.isfinite(loss):
            return
        active = float(stats.get("active_fraction", 1.0))
        if self.loss_avg is None:
            self.loss_avg, self.active_avg = loss, active
        self.loss_avg = 0.9 * self.loss_avg + 0.1 * loss
        self.active_avg = 0.9 * self.active_avg + 0.1 * active
        if not (self.loss_avg < self.loss_eps and self.active_avg < self.active_eps):
            self.since = None
            return
        if self.since is None:
            self.since = step
        if not self.noted and step - self.since + 1 >= self.stretch:
            self.noted = True
            if trainer is not None and trainer.is_main:
                best = trainer.state.best_step
                trainer.log(
                    f"note: loss and active triplets ~0 since step {self.since} (now {step}): "
                    "the batches teach little"
                    + (f"; best validation step so far {best}" if best and best > 0 else "")
                    + (
                        f"; early stopping after {trainer.cfg.patience} validations without "
                        "improvement"
                        if trainer.cfg.patience
                        else "; --patience N stops such runs early"
                    )
                )


class BestModel:
    """Model selection and early stopping: a validation that beats the best score (the
    evaluator's ``selection_metric``) saves model.safetensors; a tie keeps the later model;
    ``patience`` validations without improvement stop training (0: never). Without
    validation the latest model is the one kept."""

    def __init__(self, patience: int = 0) -> None:
        self.patience = patience

    def on_start(self, trainer) -> None:
        if trainer.state.step == 0 and trainer.val_set is None:
            self.save(trainer)

    def save(self, trainer) -> None:
        if trainer.is_main:
            save_weights(trainer.run_dir / "model.safetensors", trainer.model.state_dict())

    def on_validate(self, trainer, step: int, metrics: dict | None) -> str | None:
        st, metric = trainer.state, trainer.evaluator.selection_metric
        if metrics is None:  # no validation: the latest model is the one kept
            self.save(trainer)
            return None
        score = metrics[metric]
        if score > st.best:
            st.best, st.best_step = score, step
            st.evals_without_improvement = 0
            self.save(trainer)
            return None
        if score == st.best:
            # a tie keeps the later model: a saturated metric (MAP@R 1.0 on a handful of
            # validation classes) says nothing against the steps trained since
            st.best_step = step
            self.save(trainer)
        st.evals_without_improvement += 1
        if self.patience and st.evals_without_improvement >= self.patience:
            if trainer.is_main:
                trainer.log(
                    f"early stopping at step {step}: no {metric} improvement in "
                    f"{self.patience} evaluations"
                )
            return STOP
        return None


def _at_end_of_step(trainer) -> bool:
    """True in the last hook of a step: ``on_validate`` at validation steps, else
    ``on_step`` (what acts once a step has been decided: checkpoint, hard-class refresh)."""
    return not trainer.due(trainer.eval_every)


class Checkpointing:
    """The checkpoint (:mod:`tripletlab.train.checkpoint`): at step 0, every ``every`` steps,
    at the last step and when training stops; acts after the step's validation."""

    def __init__(self, every: int) -> None:
        self.every = every

    def on_start(self, trainer) -> None:
        if trainer.state.step == 0:
            trainer.save_checkpoint()

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> None:
        if _at_end_of_step(trainer):
            self._maybe_save(trainer)

    def on_validate(self, trainer, step: int, metrics: dict | None) -> None:
        self._maybe_save(trainer)

    def _maybe_save(self, trainer) -> None:
        if trainer.due(self.every) or trainer.stopping:
            trainer.save_checkpoint()


class HardClassRefresh:
    """``--sampler hard-class``: every ``hard_class_every`` steps (and when a resumed session
    starts at such a step) the sampler's neighbour table is recomputed with the current model
    (:func:`refresh_hard_classes`), after the step's checkpoint; ``refreshes`` / ``seconds``:
    this session's count and time (in the result)."""

    def __init__(self) -> None:
        self.refreshes, self.seconds = 0, 0.0

    def on_start(self, trainer) -> None:
        self.refreshes, self.seconds = 0, 0.0
        self._refresh(trainer)

    def on_step(self, trainer, step: int, loss: float, stats: dict) -> None:
        if _at_end_of_step(trainer):
            self._refresh(trainer)

    def on_validate(self, trainer, step: int, metrics: dict | None) -> None:
        self._refresh(trainer)

    def _refresh(self, trainer) -> None:
        if trainer.stopping or trainer.state.step >= trainer.total_steps:
            return  # no batch follows
        rec = refresh_hard_classes(trainer)
        if rec is None:
            return
        self.refreshes += 1
        self.seconds += rec["seconds"]
        if trainer.is_main:
            trainer.metrics_log.record(trainer, rec)
