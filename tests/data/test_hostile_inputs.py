"""Issue #25's hostile files for the data loaders: huge float labels, oversized CSV fields and
unreadable class folders (each a FileFormatError naming the file, line or folder)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from tripletlab import FileFormatError
from tripletlab.data import load_dataset

from helpers import make_folder


def test_a_label_of_1e30_is_an_error_not_int64_min(tmp_path):
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    y = np.array([0.0, 1.0, 1e30, 1.0])
    np.save(tmp_path / "v.npy", np.column_stack([x, y]))
    with pytest.raises(FileFormatError, match=r"label 1e\+30 is beyond"):
        load_dataset(str(tmp_path / "v.npy"))


def test_a_csv_field_over_the_limit_names_the_file_and_line(tmp_path):
    p = tmp_path / "v.csv"
    big = "1" * (csv.field_size_limit() + 10)
    p.write_text("a,b,label\n1,2,0\n3,4,1\n" + f"{big},5,1\n")
    with pytest.raises(FileFormatError, match=r"v\.csv line 4: field larger than field limit"):
        load_dataset(str(p))
    m = tmp_path / "m.csv"
    m.write_text(f"path,label\nx.png,a\n{big}.png,b\n")
    from tripletlab.data.streaming import read_image_manifest

    with pytest.raises(FileFormatError, match=r"m\.csv line 3"):
        read_image_manifest(m)


def test_an_unlistable_class_folder_is_an_error_or_a_warning(tmp_path, monkeypatch):
    """os.walk's onerror: the folder is named (the chmod 000 case as a real process, run
    without root's capabilities, is tests/serve/test_attack.py)."""
    root = make_folder(tmp_path / "imgs", n_classes=3, per_class=2, size=(8, 8))
    real = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "c1":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(FileFormatError, match=r"cannot read folder .*c1: Permission denied"):
        load_dataset(str(root))
    with pytest.warns(UserWarning, match="unreadable folder"):
        ds = load_dataset(str(root), skip_bad=True)
    assert len(ds.classes) == 2 and len(ds.y) == 4
