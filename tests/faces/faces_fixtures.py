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

__all__ = ["_one_thread", "att_face", "att_faces", "mtcnn", "tiny_run", "write_person_photos"]

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


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny image run (4 classes of 16x12 images, 6 steps) to embed faces with."""
    from tripletlab.cli import main

    from conftest import make_image_folder

    base = tmp_path_factory.mktemp("faces_run")
    data = make_image_folder(base / "imgs", n_classes=4, per_class=6, size=(16, 12))
    run = base / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--p", "2", "--k", "3"]
    fast = ["--steps", "6", "--eval-every", "3", "--embedding-dim", "8", "--quiet", "--no-report"]
    assert main([*args, "--test-classes", "class3", "--val-fraction", "0", *fast]) == 0
    return run


def write_person_photos(root: Path, faces: list[np.ndarray], suffix: str = ".png", **save):
    """Folders person0, person1 of two 320x240 scenes each (``img0``, ``img1``) with the
    first two ``faces`` pasted at fixed places; returns the generator for more scenes."""
    from faces_in_scenes import paste_scene

    g = np.random.default_rng(0)
    for c, face in enumerate(faces[:2]):
        d = root / f"person{c}"
        d.mkdir(parents=True)
        for i, (x0, y0, s) in enumerate([(30, 20, 0.8), (150, 90, 0.6)]):
            frame, _ = paste_scene([face], (240, 320), rng=g, fixed=[(x0, y0, s)])
            Image.fromarray(frame).save(d / f"img{i}{suffix}", **save)
    return g


def write_training_photos(root: Path, faces: list[np.ndarray]) -> Path:
    """person0..N-1 (one per face), three 320x240 scenes each with the person's face pasted
    at fixed places; person1 also has a photo without a face. Returns ``root``."""
    from faces_in_scenes import paste_scene, texture

    g = np.random.default_rng(0)
    for c, face in enumerate(faces):
        d = root / f"person{c}"
        d.mkdir(parents=True)
        for i, (x0, y0, s) in enumerate([(30, 20, 0.8), (150, 90, 0.6), (120, 30, 0.8)]):
            frame, _ = paste_scene([face], (240, 320), rng=g, fixed=[(x0, y0, s)])
            Image.fromarray(frame).save(d / f"img{i}.png")
    Image.fromarray(texture(120, 160, g)).save(root / "person1" / "empty.png")
    return root
