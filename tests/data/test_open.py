"""tripletlab.data.open.open_data: a data source opened from plain arguments (in memory or
streamed), the caller's choices from the data through ``choose``."""

from __future__ import annotations

import torch

from tripletlab.data.open import is_image_source, open_data

from helpers import make_folder


def test_folder_in_memory_or_streamed_and_choose_sees_the_data(tmp_path):
    root = make_folder(tmp_path / "d", n_classes=3, per_class=4, size=(20, 24))
    assert is_image_source(str(root)) and not is_image_source("digits")
    seen = []

    def choose(n, native, n_classes):
        seen.append((n, native, n_classes))
        return [10, 12], ["image size 10x12"]

    ds, files, notes = open_data(str(root), choose=choose)
    assert seen == [(12, (20, 24), 3)] and notes == ["image size 10x12"]
    assert files is None and tuple(ds.x.shape) == (12, 1, 10, 12)
    ds, files, notes = open_data(str(root), stream=True)
    assert files is not None and files.image_size == (20, 24) and ds.x.shape == (12, 0)
    assert torch.equal(ds.y, files.labels) and notes == []
    digits, none, _ = open_data("digits")
    assert none is None and len(digits) > 0
