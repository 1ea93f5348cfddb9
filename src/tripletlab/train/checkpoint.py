"""The checkpoint of a training run (``RUN/checkpoint``): the loop state and every stateful part.

:func:`save` writes the loop counters (:class:`LoopState`) and, in one loop over
:func:`stateful_tensors`, each part's state: the model (``model.*``), torch's random stream
(``rng.torch``), the augmentation's and the loss's random streams (``rng.augment``,
``rng.loss``), a cross-batch memory (``memory.*``); the optimiser's state and the JSON states of
the batches (``"sampler"``) and of the learning-rate schedule (``"scheduler"``) beside them.
:func:`restore` loads them back, so a resumed run continues with the same batches, draws and
weights as one that never stopped. The file format is the one of every earlier version (old
checkpoints resume).

Under ``--distributed`` the model and optimiser are the same on every rank, but the random
streams, a cross-batch memory and the batches' state (e.g. a stream's data workers) are each
rank's own: rank 0 gathers them (:func:`rank_parts`) and saves rank ``r``'s as ``rank.r.NAME``
tensors and ``state["ranks"][r]``; on resume with the same world size each rank loads its
own (:func:`restore` with ``rank``/``world_size``), so a killed and resumed distributed run
ends with the bytes of one that never stopped. Another world size resumes from rank 0's.

Example:
    >>> loop = LoopState(step=20, best=0.5, best_step=10)
    >>> loop_json(loop, sampler={}, scheduler={}, total_steps=40, train_time_s=1.5)["best_step"]
    10
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FileFormatError, InputError
from ..losses.memory import CrossBatchMemory
from ..rundir.files import load_checkpoint, save_checkpoint, trim_metrics

__all__ = [
    "LoopState",
    "SessionClock",
    "loop_json",
    "rank_parts",
    "restore",
    "resume",
    "save",
    "stateful_tensors",
]


@dataclass
class LoopState:
    """The training loop's counters (saved in the checkpoint's state json)."""

    step: int = 0
    best: float = -1.0  # the best validation score so far (-1: none yet)
    best_step: int = -1
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0


@dataclass
class SessionClock:
    """Training time of a run over its sessions (``before``: the earlier ones'; saved as
    ``train_time_s``) and this session's throughput."""

    start: float | None = None  # perf_counter at the start of this session
    before: float = 0.0
    step_seconds: float = 0.0  # optimisation steps only (no validation)
    step_samples: int = 0

    def train_seconds(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def throughput(self) -> float | None:
        """Training samples per second over this session's steps (batch, forward, loss,
        backward, update)."""
        return self.step_samples / self.step_seconds if self.step_seconds > 0 else None


def stateful_tensors(
    model: torch.nn.Module, augment, loss_fn, criterion
) -> dict[str, tuple[Callable[[], Any], Callable[[Any], None]]]:
    """``name -> (state_dict, load_state_dict)`` of the parts saved as tensors; a name ending
    in ``.`` holds a dict of tensors (saved as ``name + key``)."""
    parts: dict[str, tuple[Callable, Callable]] = {
        "model.": (model.state_dict, model.load_state_dict),
        "rng.torch": (torch.get_rng_state, torch.set_rng_state),
    }
    if augment is not None:
        parts["rng.augment"] = (augment.get_state, augment.set_state)
    generator = getattr(loss_fn, "generator", None)
    if generator is not None:
        parts["rng.loss"] = (generator.get_state, generator.set_state)
    if isinstance(criterion, CrossBatchMemory):
        parts["memory."] = (criterion.state_dict, criterion.load_state_dict)
    return parts


def rank_parts(tensor_parts: dict, batches) -> dict:
    """This rank's own state: every part of :func:`stateful_tensors` but the model (a dict of
    ``name -> tensor``) and the batches' JSON state (``"batches"``), to gather on rank 0."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (get, _) in tensor_parts.items():
        if name == "model.":
            continue
        value = get()
        if name.endswith("."):
            for k, v in value.items():
                tensors[name + k] = v.detach().cpu().contiguous()
        else:
            tensors[name] = value.detach().cpu().contiguous()
    return {"tensors": tensors, "batches": batches.state_dict()}


def loop_json(
    loop: LoopState, sampler: dict, scheduler: dict, total_steps: int, train_time_s: float
) -> dict:
    """The checkpoint's state json (its keys, in this order, are the file format)."""
    return {
        "step": loop.step,
        "best": loop.best,
        "best_step": loop.best_step,
        "evals_without_improvement": loop.evals_without_improvement,
        "skipped_nonfinite": loop.skipped_nonfinite,
        "sampler": sampler,
        "scheduler": scheduler,
        "total_steps": total_steps,
        "train_time_s": train_time_s,
    }


def save(
    run_dir: Path,
    tensor_parts: dict,
    optimizer: torch.optim.Optimizer,
    state: dict,
    ranks: list[dict] | None = None,
) -> None:
    """Write the checkpoint: each of ``tensor_parts`` (:func:`stateful_tensors`), the
    optimiser and ``state`` (:func:`loop_json`); ``ranks``: every rank's :func:`rank_parts`
    (distributed runs), saved as ``rank.R.NAME`` and ``state["ranks"]``."""
    tensors: dict[str, torch.Tensor] = {}
    if ranks is not None:
        state = {**state, "world_size": len(ranks), "ranks": [r["batches"] for r in ranks]}
        for r, part in enumerate(ranks):
            for k, v in part["tensors"].items():
                tensors[f"rank.{r}.{k}"] = v
    for name, (get, _) in tensor_parts.items():
        value = get()
        if name.endswith("."):
            for k, v in value.items():
                tensors[name + k] = v.detach().cpu().contiguous()
        else:
            tensors[name] = value
    save_checkpoint(run_dir, tensors, optimizer.state_dict(), state)


def restore(
    run_dir: Path,
    tensor_parts: dict,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches,
    loop: LoopState,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """Load the checkpoint of ``run_dir`` into the parts and ``loop``; returns the saved state
    json (``total_steps``, ``train_time_s``). A checkpoint of another model is a
    :class:`FileFormatError`. A distributed checkpoint of ``world_size`` ranks gives rank
    ``rank`` its own random streams, memory and batches state."""
    tensors, optim_state, state = load_checkpoint(run_dir)
    own = f"rank.{rank}."
    if state.get("world_size") == world_size and any(k.startswith(own) for k in tensors):
        mine = {k[len(own) :]: v for k, v in tensors.items() if k.startswith(own)}
        tensors = {**{k: v for k, v in tensors.items() if not k.startswith("rank.")}, **mine}
        if name_clash := [k for k in mine if k.startswith("model.")]:  # pragma: no cover
            raise FileFormatError(f"checkpoint in {run_dir}: model tensors per rank {name_clash}")
        state = {**state, "sampler": state["ranks"][rank]}
    for name, (_, load) in tensor_parts.items():
        if not name.endswith("."):
            if name in tensors:  # rng.torch is always there; the others since they exist
                load(tensors[name])
            continue
        part = {k[len(name) :]: v for k, v in tensors.items() if k.startswith(name)}
        if name == "memory." and not part:
            raise FileFormatError(
                f"checkpoint in {run_dir} has no cross-batch memory but the run uses "
                "--memory-size; resume with the run's own config.json"
            )
        try:
            load(part)
            if name == "model.":
                optimizer.load_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as e:
            if name != "model.":
                raise
            raise FileFormatError(f"checkpoint in {run_dir} does not fit this model: {e}") from None
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None]})
    batches.load_state_dict(state["sampler"])
    loop.step, loop.best, loop.best_step = state["step"], state["best"], state["best_step"]
    loop.evals_without_improvement = state["evals_without_improvement"]
    loop.skipped_nonfinite = state.get("skipped_nonfinite", 0)
    return state


def resume(
    run_dir: Path,
    tensor_parts: dict,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batches,
    loop: LoopState,
    total_steps: int,
    is_main: bool,
    log,
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """:func:`restore` a run to continue it to ``total_steps`` (an extension when larger than
    the saved one; an InputError when smaller than the step reached); metrics.jsonl loses the
    lines after the checkpoint (rank 0). Returns the training seconds of earlier sessions."""
    saved = restore(run_dir, tensor_parts, optimizer, scheduler, batches, loop, rank, world_size)
    if loop.step > total_steps:
        raise InputError(
            f"{run_dir} is at step {loop.step}; to extend it pass --steps greater than "
            f"{loop.step} (got {total_steps})"
        )
    if is_main:
        trim_metrics(run_dir, loop.step)  # later lines will be produced again
    saved_total = saved.get("total_steps", total_steps)
    extended = f" (extended from {saved_total})" if total_steps != saved_total else ""
    log(f"resumed {run_dir} at step {loop.step}/{total_steps}{extended}")
    return float(saved.get("train_time_s", 0.0))
