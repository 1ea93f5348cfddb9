"""Ctrl-C during training: the first one finishes the current step, saves a checkpoint and
stops with the command that resumes the run; a second one stops at once.

Example:
    >>> ctrl_c = CtrlC(on_request=lambda: None)
    >>> ctrl_c.requested, ctrl_c.armed
    (False, False)
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from ..errors import TrainingInterrupted

__all__ = ["CtrlC", "interrupted"]


class CtrlC:
    """The SIGINT handler of a training loop (only in the main thread: signals need it).
    ``armed``: inside the loop (outside it a Ctrl-C stops at once); ``requested``: a first
    Ctrl-C came (``on_request`` was called)."""

    def __init__(self, on_request: Callable[[], None]) -> None:
        self.on_request = on_request
        self.requested = self.armed = False
        self._previous = None

    def install(self) -> None:
        self.requested = self.armed = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.on_request()
        print(
            "\nCtrl-C: stopping after this step and saving a checkpoint "
            "(Ctrl-C again to stop at once)",
            file=sys.stderr,
            flush=True,
        )


def interrupted(run_dir: Path, step: int, total_steps: int, checkpoint_step: int):
    """The error a stopped run raises: where its checkpoint is and how to continue."""
    return TrainingInterrupted(
        f"interrupted at step {step}/{total_steps}; checkpoint at step {checkpoint_step} in "
        f"{run_dir / 'checkpoint'}. Continue with:\n"
        f"  tripletlab train --resume {shlex.quote(str(run_dir))}",
        step=checkpoint_step,
        run_dir=str(run_dir),
    )
