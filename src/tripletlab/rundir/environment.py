"""What a run ran on: library versions, the code's git commit, the machine (CPU, GPU, threads).

Recorded in ``config.json`` (``"environment"``) and shown in the report, so that a figure can
be traced to the code and the hardware that produced it.

Example:
    >>> from tripletlab.rundir.environment import environment
    >>> env = environment(threads=1)
    >>> sorted(env)[:4], env["threads"]
    (['cpu', 'cpu_count', 'device', 'git_commit'], 1)
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["environment", "git_commit"]


def git_commit(path: str | os.PathLike[str] | None = None) -> str | None:
    """The git commit of the checkout holding ``path`` (default: this package's source), with
    ``+dirty`` when it has uncommitted changes; None outside a checkout or without git."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        run = dict(cwd=where, capture_output=True, text=True, timeout=5, check=True)
        commit = subprocess.run(["git", "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **run)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty.stdout.strip() else "") if commit else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Versions (tripletlab, torch, numpy, Python), the git commit of the code, the machine
    (OS, CPU model and core count, load average, GPU name when ``device`` is CUDA) and the
    torch CPU threads used (``threads``, default torch's current setting)."""
    import numpy
    import torch

    from .. import __version__

    gpu = None
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(torch.device(device))
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {
        "tripletlab": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": sys.version.split()[0],
        "git_commit": git_commit(),
        "os": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "device": device,
        "gpu": gpu,
        "threads": threads or torch.get_num_threads(),
    }
