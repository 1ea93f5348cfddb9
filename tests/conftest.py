"""Shared fixtures: tiny synthetic image folders and the path to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ../shared/data beside the checkout; TRIPLETLAB_SHARED_DATA points elsewhere (e.g. a git worktree).
SHARED_DATA = Path(
    os.environ.get("TRIPLETLAB_SHARED_DATA")
    or (Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


def shared_data(name: str) -> Path:
    """Path of a real data set, or skip the test with a reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data {name!r} not found at {p} (../shared/data is absent)")
    return p


def make_image_folder(
    root: Path,
    n_classes: int = 4,
    per_class: int = 6,
    size=(12, 10),
    rgb: bool = False,
    nested: bool = False,
    seed: int = 0,
) -> Path:
    """Class folders of small images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / (f"group{c % 2}/class{c}" if nested else f"class{c}")
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=size)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 12, size=size), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr, mode="L")
            if rgb:
                img = img.convert("RGB")
            ext = [".png", ".pgm", ".bmp", ".jpg"][i % 4]
            img.save(d / f"img{i}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "imgs")
