"""Gradient caching: the exact mined loss of a batch larger than memory.

Gao, Zhang, Han & Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (GradCache). A mined triplet loss couples every item of the batch, so gradient
accumulation (one backward per micro-batch) changes the loss: each micro-batch mines only among
its own items. Caching keeps the loss of the whole batch and splits only the model's work:

1. embed the batch in chunks of ``chunk_size`` **without a graph** (only the ``B x D``
   embeddings are held), recording the random state before each chunk;
2. compute the loss ``L(E, y)`` on the whole batch (any strategy, soft margin, a memory bank, the
   distributed loss) and its gradient ``G = dL/dE`` (``B x D``);
3. re-run each chunk ``c`` **with** a graph, the random state of step 1 replayed (dropout draws
   the same masks), and backpropagate ``G_c``: by the chain rule
   ``dL/dθ = Σ_c (dE_c/dθ)ᵀ G_c``, which is the gradient of one backward through the whole batch.

Memory: the activations of one chunk plus the embeddings; cost: one extra forward pass.
BatchNorm in training mode normalises each chunk with the chunk's statistics, so the result is
the gradient of the chunked forward, not of one forward over the batch: a warning names the way
to freeze it (its running statistics are updated once per chunk, as in step 1, not twice).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import InputError

__all__ = [
    "backward_in_chunks",
    "batch_length",
    "cached_backward",
    "check_chunk_size",
    "embed_in_chunks",
    "embedding_gradient",
    "warn_batchnorm",
]

Inputs = Any  # a tensor (B, ...), a mapping of such tensors (a tokenizer's output) or a sequence

BN_WARNING = (
    "BatchNorm in training mode normalises each chunk of {chunk} items with the chunk's "
    "statistics, not the batch's ({batch}): the cached gradient is that of the chunked forward; "
    "freeze BatchNorm (its layers in eval mode; tripletlab backbones: freeze_bn=True, the "
    "default, i.e. drop --no-freeze-bn; the mlp model: model_options batchnorm=false)"
)


def check_chunk_size(chunk_size: int) -> int:
    """``chunk_size`` as an int >= 1, else an :class:`~tripletlab.errors.InputError`."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise InputError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    return chunk_size


def batch_length(inputs: Inputs) -> int:
    """The number of items of ``inputs`` (a tensor's rows, a mapping's shared first dimension,
    a sequence's length)."""
    if isinstance(inputs, torch.Tensor):
        return int(inputs.shape[0])
    if isinstance(inputs, Mapping):
        for key in ("input_ids", "attention_mask"):  # a tokenizer's output
            if isinstance(inputs.get(key), torch.Tensor):
                return int(inputs[key].shape[0])
        sizes = {
            int(v.shape[0]) for v in inputs.values() if isinstance(v, torch.Tensor) and v.dim() > 0
        }
        if len(sizes) != 1:
            raise InputError(f"the inputs' tensors disagree on the batch size: {sorted(sizes)}")
        return sizes.pop()
    if isinstance(inputs, Sequence):
        return len(inputs)
    raise InputError(
        f"inputs must be a tensor, a mapping of tensors or a sequence, got {type(inputs)}"
    )


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(inputs, Mapping):
        return {
            k: v[start:stop] if isinstance(v, torch.Tensor) and v.dim() > 0 else v
            for k, v in inputs.items()
        }
    return inputs[start:stop]


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def _cuda_devices(model: Any, inputs: Inputs) -> list[torch.device]:
    devs: set[torch.device] = set()
    if isinstance(model, nn.Module):
        devs.update(p.device for p in model.parameters())
    values = inputs.values() if isinstance(inputs, Mapping) else [inputs]
    devs.update(v.device for v in values if isinstance(v, torch.Tensor))
    return sorted((d for d in devs if d.type == "cuda"), key=str)


class _RngState:
    """The CPU and CUDA random states at one moment, to be put back later."""

    def __init__(self, devices: list[torch.device]) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda:
            torch.cuda.set_rng_state(s, d)


def _training_batchnorms(model: Any) -> list[nn.Module]:
    if not isinstance(model, nn.Module):
        return []
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def warn_batchnorm(model: Any, chunk_size: int, batch_size: int) -> bool:
    """Warn (one line) when ``model`` holds a BatchNorm in training mode and the batch is
    chunked; True when it warned."""
    if chunk_size >= batch_size or not _training_batchnorms(model):
        return False
    warnings.warn(BN_WARNING.format(chunk=chunk_size, batch=batch_size), UserWarning, stacklevel=3)
    return True


def _autocast(amp: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp)


def _device_of(model: Any, inputs: Inputs) -> torch.device:
    cuda = _cuda_devices(model, inputs)
    return cuda[0] if cuda else torch.device("cpu")


class ChunkRecord:
    """What :func:`embed_in_chunks` leaves for :func:`backward_in_chunks`: the chunk bounds,
    the random state before each chunk, the module (BatchNorm, devices, ``no_sync``) and the
    running statistics of its training-mode BatchNorm layers after the graph-free pass."""

    def __init__(self, bounds: list[tuple[int, int]], states: list[_RngState], module: Any) -> None:
        self.bounds, self.states, self.module = bounds, states, module
        self.bn_buffers: list[tuple[torch.Tensor, torch.Tensor]] = []


def embed_in_chunks(
    model: Callable[[Inputs], torch.Tensor],
    inputs: Inputs,
    chunk_size: int,
    *,
    amp: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    module: nn.Module | None = None,
) -> tuple[torch.Tensor, ChunkRecord]:
    """Step 1: ``model`` on each chunk of ``inputs`` without a graph (under autocast ``amp``),
    the embeddings concatenated (cast to ``dtype`` when given) and the :class:`ChunkRecord`.
    ``module``: the network behind ``model`` when ``model`` is a plain function (its BatchNorm
    layers, devices and DDP ``no_sync``); default ``model`` itself."""
    check_chunk_size(chunk_size)
    n = batch_length(inputs)
    module = module if module is not None else model
    warn_batchnorm(module, chunk_size, n)
    devices = _cuda_devices(module, inputs)
    device = devices[0] if devices else torch.device("cpu")
    record = ChunkRecord(_chunks(n, chunk_size), [], module)
    outs = []
    with torch.no_grad():
        for start, stop in record.bounds:
            record.states.append(_RngState(devices))
            with _autocast(amp, device):
                out = model(_slice(inputs, start, stop))
            outs.append(out if dtype is None else out.to(dtype))
    record.bn_buffers = [
        (buf, buf.detach().clone()) for m in _training_batchnorms(module) for buf in m.buffers()
    ]
    return torch.cat(outs, dim=0), record


def backward_in_chunks(
    model: Callable[[Inputs], torch.Tensor],
    inputs: Inputs,
    grad: torch.Tensor,
    record: ChunkRecord,
    *,
    amp: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Step 3: re-run each chunk with a graph, its random state replayed, and backpropagate
    its rows of ``grad`` (dL/dE) into the parameters (``.grad`` accumulates). Under DDP, the
    gradients are synchronised on the last chunk only (``no_sync``). Afterwards the random
    state is the one after the loss (as on the plain path) and BatchNorm running statistics
    are those of step 1."""
    module = record.module
    after = _RngState(_cuda_devices(module, inputs))
    device = _device_of(module, inputs)
    last = len(record.bounds) - 1
    for i, ((start, stop), state) in enumerate(zip(record.bounds, record.states, strict=True)):
        state.restore()
        sync = contextlib.nullcontext()
        if i < last and hasattr(module, "no_sync"):
            sync = module.no_sync()
        with sync, torch.enable_grad():  # (a backward hook runs without grad mode)
            with _autocast(amp, device):
                out = model(_slice(inputs, start, stop))
            if dtype is not None:
                out = out.to(dtype)
            if out.requires_grad:
                out.backward(grad[start:stop].to(out.dtype))
    after.restore()
    with torch.no_grad():
        for buf, saved in record.bn_buffers:
            buf.copy_(saved)


def cached_backward(
    model: Callable[[Inputs], torch.Tensor],
    inputs: Inputs,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    chunk_size: int,
    *,
    amp: torch.dtype | None = None,
    scaler: Any = None,
) -> torch.Tensor:
    """The loss of the whole batch, its exact gradient accumulated into ``model``'s parameters
    while only ``chunk_size`` items are ever embedded with a graph (Gao et al. 2021).

    ``E = [f(x_c)]_c`` embedded without a graph, ``L = loss_fn(E, y)``, ``G = dL/dE``; then
    ``dL/dθ = Σ_c (df(x_c)/dθ)ᵀ G_c``, each chunk re-run with its random state replayed, so
    dropout draws the same masks: the gradient equals one backward through
    ``loss_fn(cat_c f(x_c), y)``. ``loss_fn`` is called once on the whole batch, so any
    :class:`~tripletlab.TripletLoss` strategy, soft margin, a
    :class:`~tripletlab.CrossBatchMemory` (enqueued once) or a
    :class:`~tripletlab.losses.DistributedTripletLoss` (the local batch chunked on each rank)
    work unchanged. ``chunk_size >= B`` is the plain path (one forward and backward).

    Args:
        model: a module or function mapping a chunk of ``inputs`` to its embeddings.
        inputs: a tensor (B, ...), a mapping of (B, ...) tensors (a tokenizer's output) or a
            sequence of B items.
        labels: (B,) integer labels.
        loss_fn: ``loss_fn(embeddings, labels) -> scalar``.
        chunk_size: items per forward with a graph (>= 1).
        amp: run the forward passes under ``torch.autocast`` with this dtype; the embeddings
            are then cast to float32 for the loss.
        scaler: a ``torch.amp.GradScaler`` (float16): the cached gradient is that of the scaled
            loss, so ``scaler.step(optimizer)`` follows as usual.

    Returns:
        The loss, detached (``.grad`` of the parameters holds its gradient, added to what was
        there).

    Example:
        >>> import torch
        >>> from tripletlab import TripletLoss
        >>> from tripletlab.losses.gradient_cache import cached_backward
        >>> torch.manual_seed(0) and None
        >>> model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.1),
        ...                             torch.nn.Linear(8, 4))
        >>> x, y = torch.randn(32, 5), torch.arange(8).repeat_interleave(4)
        >>> loss = cached_backward(model, x, y, TripletLoss(strategy="hard"), chunk_size=8)
        >>> loss.requires_grad, model[0].weight.grad.shape
        (False, torch.Size([8, 5]))
    """
    check_chunk_size(chunk_size)
    n = batch_length(inputs)
    cast = torch.float32 if amp is not None else None
    if chunk_size >= n:  # the plain path
        with _autocast(amp, _device_of(model, inputs)):
            emb = model(inputs)
        loss = loss_fn(emb if cast is None else emb.to(cast), labels)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach()
    emb, record = embed_in_chunks(model, inputs, chunk_size, amp=amp, dtype=cast)
    emb = emb.detach().requires_grad_(True)
    loss = loss_fn(emb, labels)
    grad = embedding_gradient(loss, emb, scaler)
    backward_in_chunks(model, inputs, grad, record, amp=amp, dtype=cast)
    return loss.detach()


def embedding_gradient(
    loss: torch.Tensor, embeddings: torch.Tensor, scaler: Any = None
) -> torch.Tensor:
    """Step 2: ``dL/dE`` (of the scaled loss when a GradScaler is given); zeros when the loss
    does not depend on the embeddings."""
    target = scaler.scale(loss) if scaler is not None else loss
    if not target.requires_grad:
        return torch.zeros_like(embeddings)
    (grad,) = torch.autograd.grad(target, embeddings, allow_unused=True)
    return torch.zeros_like(embeddings) if grad is None else grad
