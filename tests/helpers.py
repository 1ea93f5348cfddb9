"""Helpers shared by test files in different packages: image folders and subprocess setup."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
from PIL import Image

import tripletlab

#: the source tree the package was imported from (put on a subprocess's PYTHONPATH)
SRC = str(Path(tripletlab.__file__).resolve().parents[1])


def make_folder(root, n_classes=4, per_class=6, size=(20, 24), rgb=False):
    """An image folder ROOT/c<i>/<j>.png of seeded random pixels."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if rgb else size
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


def free_port() -> int:
    """A free TCP port on the loopback address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """The environment for a child process: no torchrun variables, this source tree, 1 thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env
