"""Fixtures of the face tests: the MTCNN detector (skips without its weights package) and
AT&T faces (skip without ../shared/data). Imported by each test module (``from faces_fixtures
import ...``): a nested ``conftest.py`` would shadow tests/conftest.py, which other tests
import by the name ``conftest``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

__all__ = ["_one_thread", "att_face", "att_faces", "mtcnn"]

# as tests/conftest.py (a nested conftest cannot import that module by name)
_SHARED = Path(
    os.environ.get("TRIPLETLAB_SHARED_DATA")
    or (Path(__file__).resolve().parents[2] / ".." / "shared" / "data")
).resolve()


def shared_data(name: str) -> Path:
    p = _SHARED / name
    if not p.exists():
        pytest.skip(f"real data {name!r} not found at {p} (../shared/data is absent)")
    return p


@pytest.fixture(autouse=True)
def _one_thread():
    """MTCNN's layers are small: on the shared 2-core machine 2 threads wait on each other
    (~1 s per frame instead of ~40 ms); the previous setting is restored after each test."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mtcnn():
    from tripletlab.errors import MissingDependencyError
    from tripletlab.faces import MTCNN

    try:
        return MTCNN()
    except MissingDependencyError as e:
        pytest.skip(f"MTCNN weights not installed ({e})")


@pytest.fixture(scope="session")
def att_face() -> np.ndarray:
    """The first AT&T image of s1: (112, 92) uint8 grey."""
    return np.asarray(Image.open(shared_data("att_faces") / "s1" / "1.pgm").convert("L"))


@pytest.fixture(scope="session")
def att_faces() -> list[np.ndarray]:
    root = shared_data("att_faces")
    return [np.asarray(Image.open(root / f"s{s}" / "1.pgm").convert("L")) for s in (1, 2, 3, 4)]
