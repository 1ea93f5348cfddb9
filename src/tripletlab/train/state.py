"""Checkpoints of a :class:`~tripletlab.train.Trainer`: save, restore (exact resume) and the best
model's weights.

A mixin of :class:`~tripletlab.train.Trainer`: methods only; the state lives on the trainer.
"""

from __future__ import annotations

import time

import torch

from ..errors import (
    FileFormatError,
    InputError,
)
from ..losses.memory import CrossBatchMemory
from ..rundir.files import (
    load_checkpoint,
    save_checkpoint,
    save_weights,
    trim_metrics,
)


class TrainerState:
    """Methods of :class:`~tripletlab.train.Trainer` (see the module docstring)."""

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
