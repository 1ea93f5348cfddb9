"""A micro-batching queue: concurrent requests share one model call, off the event loop."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BatchQueue"]


@dataclass
class _Job:
    kind: str  # "images" or "vectors": only jobs of one kind share a model call
    items: list  # PIL images, or rows of a float array
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)


class BatchQueue:
    """Run ``fns[kind](items) -> np.ndarray (len(items), D)`` in one worker thread, joining the
    jobs that arrive within ``max_wait_s`` of each other into batches of up to ``max_batch``
    items. ``await queue.submit(kind, items)`` returns the job's own rows, or raises the error
    of its own items: when a batch fails, its jobs are run again one by one, so one bad
    request never fails the others that shared its model call.

    Example:
        >>> q = BatchQueue({"vectors": lambda xs: np.stack(xs) * 2})
        >>> q.start()
        >>> asyncio.run(q.submit("vectors", [np.ones(2)]))
        array([[2., 2.]])
        >>> q.stop()
    """

    def __init__(
        self,
        fns: dict[str, Callable[[list], np.ndarray]],
        max_batch: int = 64,
        max_wait_s: float = 0.002,
    ) -> None:
        self.fns, self.max_batch, self.max_wait_s = fns, int(max_batch), float(max_wait_s)
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.items = 0
        self.isolated = 0  # failed batches whose jobs were retried one by one

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="tripletlab-batcher", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=10)
            self._thread = None

    async def submit(self, kind: str, items: list) -> np.ndarray:
        if kind not in self.fns:
            raise ValueError(f"unknown job kind {kind!r}")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._q.put(_Job(kind, list(items), fut, loop))
        return await fut

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        pending: _Job | None = None
        while True:
            job = pending if pending is not None else self._q.get()
            pending = None
            if job is None:
                return
            batch, n = [job], len(job.items)
            deadline = time.perf_counter() + self.max_wait_s
            while n < self.max_batch:
                try:
                    nxt = self._q.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None or nxt.kind != job.kind or n + len(nxt.items) > self.max_batch:
                    pending = nxt if nxt is not None else None
                    if nxt is None:
                        self._q.put(None)
                    break
                batch.append(nxt)
                n += len(nxt.items)
            self._execute(batch)

    def _execute(self, batch: list[_Job]) -> None:
        """One model call for the batch; if it fails, each job is retried alone, so a bad
        item fails its own request and never the requests batched with it."""
        items = [it for j in batch for it in j.items]
        try:
            out = self.fns[batch[0].kind](items)
            self.batches += 1
            self.items += len(items)
        except BaseException as e:  # noqa: BLE001 - isolated below, or handed to its request
            if len(batch) == 1 or not isinstance(e, Exception):
                for j in batch:
                    j.loop.call_soon_threadsafe(_set_exception, j.future, e)
                return
            self.isolated += 1
            for j in batch:
                self._execute([j])
            return
        s = 0
        for j in batch:
            rows = out[s : s + len(j.items)]
            s += len(j.items)
            j.loop.call_soon_threadsafe(_set_result, j.future, rows)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
