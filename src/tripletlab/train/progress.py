"""What a :class:`~tripletlab.train.Trainer` reports while it runs: metrics.jsonl records, progress
lines, TensorBoard, and the thread count it chose.

A mixin of :class:`~tripletlab.train.Trainer`: methods only; the state lives on the trainer.
"""

from __future__ import annotations

import copy
import math
import sys
import time

import torch

from ..metrics.evaluate import (
    EvalResult,
)
from ..rundir.files import (
    append_metrics,
    read_json,
)

_LOGGED_STATS = (
    "active_fraction",
    "mean_d_ap",
    "mean_d_an",
    "mean_distance",
    "n_triplets",
    "memory_active_fraction",
    "memory_n_triplets",
)


def _clock(seconds: float) -> str:
    """``h:mm:ss`` / ``m:ss`` of a duration ('?' when unknown)."""
    if not math.isfinite(seconds):
        return "?"
    m, sec = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TrainerLogging:
    """Methods of :class:`~tripletlab.train.Trainer` (see the module docstring)."""

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

        frozen = bool(getattr(model, "frozen", False))
        if frozen:  # a frozen backbone's work is one inference pass: time a small one
            x, steps = x[:8], 1

        def seconds(n: int) -> float:
            torch.set_num_threads(n)
            best = float("inf")
            with torch.random.fork_rng(devices=[]):
                for i in range(steps + 1):
                    t = time.perf_counter()
                    if frozen:
                        with torch.no_grad():
                            model.features(x)
                    else:
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
