"""Embedding a large data set over several processes (``tripletlab embed|index --distributed``
under torchrun): every rank embeds one contiguous share of the items, rank 0 gathers the shares
in rank order (which is the original item order) and alone writes the output.

Example::

    # torchrun --nproc_per_node 2 -m tripletlab embed --distributed --model RUN --data D --out e.npz
    env = init_from_env("cpu", 120, command="embed")
    merged = embed_sharded(inf, "photos/", stream=True, env=env)  # None on ranks > 0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..losses.distributed import is_distributed
from ..runtime.process_group import DistEnv

__all__ = [
    "Embedded",
    "align_faces_on_main",
    "embed_sharded",
    "gather_objects_to_main",
    "gather_to_main",
    "shard_bounds",
]


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous share of ``n`` items of ``rank`` (sizes differ by at most
    one; earlier ranks get the extra items).

    Example:
        >>> [shard_bounds(5, r, 2) for r in (0, 1)]
        [(0, 3), (3, 5)]
    """
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def gather_to_main(x: torch.Tensor) -> torch.Tensor | None:
    """The ranks' tensors concatenated along dim 0 in rank order on rank 0 (None on the other
    ranks); ``x`` itself without a process group. Shapes may differ in dim 0 only.

    Example:
        >>> gather_to_main(torch.ones(2, 3)).shape  # one process
        torch.Size([2, 3])
    """
    if not is_distributed():
        return x
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")  # fmt: skip
    n = torch.tensor([x.shape[0]], device=device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    counts = [int(s) for s in sizes]
    padded = torch.zeros((max(counts), *x.shape[1:]), dtype=x.dtype, device=device)
    padded[: x.shape[0]] = x.to(device)
    main = dist.get_rank() == 0
    out = [torch.zeros_like(padded) for _ in counts] if main else None
    dist.gather(padded, out, dst=0)
    if not main:
        return None
    return torch.cat([t[:c] for t, c in zip(out, counts, strict=True)]).cpu()


def gather_objects_to_main(items: list | None) -> list | None:
    """The ranks' lists concatenated in rank order on rank 0 (None elsewhere; None stays None
    when every rank has None)."""
    if not is_distributed():
        return items
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(items, out, dst=0)
    if out is None:
        return None
    if all(part is None for part in out):
        return None
    return [x for part in out for x in (part or [])]


@dataclass
class Embedded:
    """Embeddings of a data set with what identifies each row."""

    embeddings: np.ndarray  # (N, D) float32
    labels: torch.Tensor  # (N,)
    paths: list[str] | None
    classes: list[str]
    texts: list[str] | None = None


def align_faces_on_main(inf, data: str | None, env: DistEnv) -> None:
    """``--distributed --faces``: rank 0 aligns the image folder ``data`` into the run's face
    cache (:meth:`~tripletlab.inference.Inference.face_folder`) while the other ranks wait in a
    broadcast (bounded by the process group's timeout, ``--dist-timeout``); then every rank
    finds the aligned folder in the cache and reads its own share of it. A failure on rank 0
    stops every rank (rank 0 with its own error, the others with an
    :class:`~tripletlab.errors.InputError` that points to it). Nothing to do for data that is
    not a folder, or for the run's own test split (read from ``RUN_DIR/faces/``).

    Example:
        >>> align_faces_on_main(inf, "photos/", env)  # doctest: +SKIP
    """
    from pathlib import Path

    from ..errors import InputError
    from ..runtime.process_group import broadcast_flag

    if data is None or not Path(data).is_dir() or not inf.takes_images:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if env.backend == "nccl" \
        else torch.device("cpu")  # fmt: skip
    if env.is_main:
        try:
            inf.face_folder(data)
        except BaseException:
            broadcast_flag(False, device)  # the others stop now, not at the timeout
            raise
        finally:
            inf.release_faces()
        broadcast_flag(True, device)
        return
    try:
        ok = broadcast_flag(False, device)
    except RuntimeError as e:  # rank 0 took longer than the timeout, or is gone
        raise InputError(
            f"--faces: rank 0 did not finish aligning the faces of {data} within --dist-timeout "
            f"({type(e).__name__}): raise --dist-timeout, or align the folder first with "
            "`tripletlab faces FOLDER --out ALIGNED` and embed that"
        ) from None
    if not ok:
        raise InputError(
            f"--faces: rank 0 could not align the faces of {data} (its error says why)"
        )


def embed_sharded(
    inf,
    data: str | None,
    *,
    stream: bool,
    env: DistEnv,
    skip_bad: bool = False,
    workers: int | None = None,
    batch_size: int = 256,
) -> Embedded | None:
    """Embed this rank's share of ``data`` with ``inf`` (an :class:`~tripletlab.inference.
    Inference`) and merge the shares on rank 0 in the original order (None on other ranks).
    ``stream``: image folders/manifests decoded in batches (each rank decodes only its own
    files); otherwise the data set is loaded on every rank and each embeds its rows.
    Unreadable images skipped with ``skip_bad`` leave their rows out, as in one process.
    Each share is embedded by :func:`tripletlab.inference.embed.embed` (through
    ``inf.embed_source`` / ``inf.embed_dataset``, which add the run's preprocessing checks).

    Example:
        >>> embed_sharded(inf, "photos/", stream=True, env=env)  # doctest: +SKIP
    """
    rank, world = env.rank, env.world_size
    texts = None
    if getattr(inf, "faces", None) is not None:
        align_faces_on_main(inf, data, env)
    if stream:
        emb, labels, paths, classes = inf.embed_source(
            data, skip_bad=skip_bad, workers=workers, batch_size=batch_size, shard=(rank, world)
        )
    else:
        ds = inf.load_data(data, skip_bad)
        lo, hi = shard_bounds(len(ds), rank, world)
        part = ds.subset(np.arange(lo, hi))
        emb = inf.embed_dataset(part, batch_size=batch_size)
        labels, paths, classes, texts = part.y, part.paths, ds.classes, part.texts
    all_emb = gather_to_main(torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32)))
    all_labels = gather_to_main(torch.as_tensor(labels, dtype=torch.long))
    all_paths = gather_objects_to_main(list(paths) if paths is not None else None)
    all_texts = gather_objects_to_main(list(texts) if texts is not None else None)
    if all_emb is None or all_labels is None:
        return None
    return Embedded(all_emb.numpy(), all_labels, all_paths, list(classes), all_texts)
