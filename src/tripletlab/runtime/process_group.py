"""The torchrun process group for training and embedding: join it from the environment, leave it,
agree on a flag across ranks, and BatchNorm over the global batch on any backend.

The sharded global mining itself (gathered embeddings, reduce-scattered gradients) is a loss:
:mod:`tripletlab.losses.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError
from ..losses.distributed import is_distributed

__all__ = [
    "DistEnv",
    "GlooSyncBatchNorm",
    "any_rank",
    "broadcast_flag",
    "convert_sync_batchnorm_any",
    "init_from_env",
    "shutdown",
]


# ------------------------------------------------------------------ process group for training
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistEnv:
    """This process's place in the process group (``created``: this module initialised it)."""

    rank: int
    world_size: int
    local_rank: int
    backend: str
    created: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and prints."""
        return self.rank == 0


def init_from_env(device: str = "cpu", timeout_s: float = 60.0, command: str = "train") -> DistEnv:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    ``timeout_s`` bounds every collective: when a rank dies or hangs, the others stop with an
    error after at most that long instead of waiting forever. Without torchrun's variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) this is an
    :class:`~tripletlab.errors.InputError` that says how to launch.

    Example::

        # torchrun --nproc_per_node 2 my_script.py
        env = init_from_env("cpu", timeout_s=60)
        print(env.rank, env.world_size)
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(
            dist.get_rank(),
            dist.get_world_size(),
            int(os.environ.get("LOCAL_RANK", 0)),
            dist.get_backend(),
        )
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise InputError(
            f"--distributed needs torchrun's environment ({', '.join(missing)} not set): launch "
            f"with  torchrun --nproc_per_node N -m tripletlab {command} --distributed ...  (or "
            "drop --distributed for one process)"
        )
    if not dist.is_available():
        raise InputError("this PyTorch build has no torch.distributed")
    if timeout_s <= 0:
        raise InputError(f"--dist-timeout must be > 0 seconds, got {timeout_s}")
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "gloo"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda but CUDA is not available; use --device cpu (gloo)")
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, created=True)


def shutdown(env: DistEnv | None, clean: bool = True) -> None:
    """Leave the process group if :func:`init_from_env` created it; ``clean``: wait for every
    rank first (a rank that tears down its connections while a peer still uses them can make
    gloo abort that peer)."""
    if env is not None and env.created and dist.is_available() and dist.is_initialized():
        if clean:
            try:
                dist.barrier()
            except RuntimeError:  # a peer is gone: nothing left to wait for
                pass
        dist.destroy_process_group()


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when ``flag`` is True on at least one (False without a group)."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_flag(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Rank 0's ``flag`` on every rank."""
    if not is_distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


# ------------------------------------------------------------------ BatchNorm over ranks (gloo)
class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch of all ranks, for any
    backend (torch's ``SyncBatchNorm`` is CUDA-only). Per-channel sums and sums of squares are
    all-reduced with autograd (``torch.distributed.nn.functional.all_reduce``), so values and
    gradients equal one process's BatchNorm on the concatenated batch (up to the one-pass
    variance's rounding). Outside a process group or in eval mode it is plain BatchNorm.
    Parameters, buffers and state-dict keys are those of the layer it replaces.

    Example:
        >>> m = convert_sync_batchnorm_any(torch.nn.Sequential(torch.nn.BatchNorm1d(3)))
        >>> type(m[0]).__name__
        'GlooSyncBatchNorm'
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise InputError(f"BatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        self._check_input_dim(x)
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce as all_reduce_grad

        c = x.shape[1]
        dims = [0, *range(2, x.dim())]
        n_local = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        packed = torch.cat([x.sum(dims), (x * x).sum(dims), n_local])
        total = all_reduce_grad(packed)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        shape = [1, c] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum
                if m is None:
                    m = 1.0 / float(self.num_batches_tracked)
                nn_ = float(n.detach())
                unbiased = var.detach() * (nn_ / max(nn_ - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def convert_sync_batchnorm_any(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` by a :class:`GlooSyncBatchNorm` sharing its
    parameters and buffers (in place for children; returns the possibly new root)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlooSyncBatchNorm
    ):
        new = GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        if module.track_running_stats:
            new.running_mean, new.running_var = module.running_mean, module.running_var
            new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm_any(child))
    return module
