"""Data loaders and splits (the PK sampler and the models have their own test files)."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from tripletlab import FileFormatError, InputError, MissingFileError
from tripletlab.data import Dataset, apply_split, load_dataset, split_dataset

from conftest import make_image_folder, shared_data


def test_digits_builtin():
    ds = load_dataset("digits")
    assert ds.x.shape == (1797, 64) and ds.x.min() >= 0 and ds.x.max() <= 1
    assert ds.classes == [str(i) for i in range(10)] and ds.kind == "vector"


def test_image_folder_nested_classes_formats_and_modes(tmp_path):
    root = make_image_folder(tmp_path / "a", n_classes=4, per_class=4, nested=True)
    ds = load_dataset(str(root))
    assert ds.x.shape == (16, 1, 12, 10) and ds.kind == "image"
    assert ds.classes == ["group0/class0", "group0/class2", "group1/class1", "group1/class3"]
    assert all(os.path.exists(p) for p in ds.paths)
    rgb = load_dataset(
        str(make_image_folder(tmp_path / "b", rgb=True)), grayscale=False, image_size=(8, 8)
    )
    assert rgb.x.shape[1:] == (3, 8, 8)


def test_channels_default_grey_unless_some_image_has_colour(tmp_path):
    from PIL import Image

    root = make_image_folder(tmp_path / "m", n_classes=2, per_class=3, size=(6, 6))
    grey = load_dataset(str(root))
    assert grey.input_shape == (1, 6, 6)
    # a palette GIF with only grey colours is grey
    Image.fromarray(np.full((6, 6), 77, np.uint8), mode="L").convert("P").save(
        root / "class0" / "zz_pal.gif"
    )
    assert load_dataset(str(root)).input_shape == (1, 6, 6)
    # one colour image (sorted last) turns the whole set RGB; grey images are replicated
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb, mode="RGB").save(root / "class1" / "zz_colour.png")
    ds = load_dataset(str(root))
    assert ds.input_shape == (3, 6, 6) and len(ds) == 8
    i = ds.paths.index(str(root / "class0" / "img0.png"))
    assert torch.equal(ds.x[i, 0], ds.x[i, 1]) and torch.equal(ds.x[i, 0], grey.x[0, 0])
    j = ds.paths.index(str(root / "class1" / "zz_colour.png"))
    assert ds.x[j, 0].min() > 0.78 and ds.x[j, 1:].max() == 0
    assert load_dataset(str(root), grayscale=True).input_shape == (1, 6, 6)


def test_subset_keeps_the_predefined_split_renumbered():
    x = torch.arange(6, dtype=torch.float32)[:, None]
    ds = Dataset(
        x=x,
        y=torch.tensor([0, 1, 0, 1, 0, 1]),
        classes=["a", "b"],
        paths=None,
        kind="vector",
        name="t",
        predefined_split={"train": [0, 1, 2, 3], "test": [4, 5]},
    )
    sub = ds.subset([5, 1, 2])
    assert sub.predefined_split == {"train": [1, 2], "test": [0]}
    assert sub.x[sub.predefined_split["test"]].flatten().tolist() == [5.0]
    with pytest.raises(InputError, match="out of range"):
        ds.subset([6])


def test_image_folder_bad_files(tmp_path):
    root = make_image_folder(tmp_path / "c", n_classes=3, per_class=3)
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "corrupt.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(FileFormatError, match="empty.png"):
        load_dataset(str(root))
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        ds = load_dataset(str(root), skip_bad=True)
    assert len(ds) == 9
    (root / "notes.txt").write_text("hello")
    with pytest.raises(FileFormatError, match="not images"):
        load_dataset(str(root))


def test_mixed_sizes_need_image_size_and_symlink_loop(tmp_path):
    root = make_image_folder(tmp_path / "d", n_classes=2, per_class=2)
    make_image_folder(tmp_path / "e", n_classes=1, per_class=2, size=(20, 20))
    os.rename(tmp_path / "e" / "class0", root / "big")
    with pytest.raises(FileFormatError, match="image-size"):
        load_dataset(str(root))
    os.symlink(root, root / "class0" / "loop")  # a directory symlink loop must not hang
    with pytest.warns(UserWarning, match="ignored 1 folders"):
        ds = load_dataset(str(root), image_size=(16, 16))
    assert ds.x.shape == (6, 1, 16, 16)


def test_symlinked_folders_outside_root_are_read_once_and_hidden_folders_ignored(tmp_path):
    root = make_image_folder(tmp_path / "g", n_classes=2, per_class=2)
    outside = make_image_folder(tmp_path / "elsewhere", n_classes=1, per_class=3, seed=1)
    os.symlink(outside / "class0", root / "linked")  # a class kept elsewhere: read
    os.symlink(outside / "class0", root / "linked_again")  # same target again: ignored
    os.symlink(root / "class1", root / "alias")  # a second name inside ROOT: ignored
    os.symlink(outside, outside / "class0" / "up")  # a loop outside ROOT: ignored
    make_image_folder(root / ".ipynb_checkpoints", n_classes=1, per_class=1)
    with pytest.warns(UserWarning, match="ignored 3 folders") as record:
        ds = load_dataset(str(root))
    assert ds.classes == ["class0", "class1", "linked"] and len(ds) == 7
    assert sorted(ds.paths)[-1].startswith(str(root / "linked"))
    assert "alias" in str(record[0].message)
    os.symlink(tmp_path / "nowhere.png", root / "class0" / "broken.png")
    with pytest.raises(FileFormatError, match="broken.png"), pytest.warns(UserWarning):
        load_dataset(str(root))


def test_non_utf8_file_names(tmp_path):
    root = make_image_folder(tmp_path / "f", n_classes=2, per_class=2)
    src = root / "class0" / "img0.png"
    os.rename(src, os.path.join(os.fsencode(root / "class0"), b"caf\xe9.png"))
    ds = load_dataset(str(root))
    assert len(ds) == 4 and all(os.path.exists(p) for p in ds.paths)
    assert any("\udce9" in p for p in ds.paths)  # the real (undecodable) name is kept


def _write_idx(path, arr, gz):
    code = {np.uint8: 0x08}[arr.dtype.type]
    data = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data += arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory(tmp_path, gz):
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    _write_idx(
        tmp_path / f"train-images-idx3-ubyte{suffix}",
        rng.integers(0, 255, (20, 6, 6)).astype(np.uint8),
        gz,
    )
    _write_idx(
        tmp_path / f"train-labels-idx1-ubyte{suffix}", (np.arange(20) % 4).astype(np.uint8), gz
    )
    _write_idx(
        tmp_path / f"t10k-images-idx3-ubyte{suffix}",
        rng.integers(0, 255, (8, 6, 6)).astype(np.uint8),
        gz,
    )
    _write_idx(
        tmp_path / f"t10k-labels-idx1-ubyte{suffix}", (np.arange(8) % 4).astype(np.uint8), gz
    )
    ds = load_dataset(str(tmp_path))
    assert ds.x.shape == (28, 1, 6, 6) and ds.predefined_split["test"] == list(range(20, 28))
    train, test, info = split_dataset(ds, by="predefined")
    assert len(train) == 20 and len(test) == 8
    resized = load_dataset(str(tmp_path), image_size=(4, 5), grayscale=False)
    assert resized.input_shape == (3, 4, 5) and resized.predefined_split == ds.predefined_split
    p = tmp_path / f"t10k-images-idx3-ubyte{suffix}"
    raw = gzip.decompress(p.read_bytes()) if gz else p.read_bytes()
    (gzip.open if gz else open)(p, "wb").write(raw[:-5])
    with pytest.raises(FileFormatError, match="truncated"):
        load_dataset(str(tmp_path))


def test_vector_files(tmp_path):
    x = np.random.default_rng(0).normal(size=(10, 3))
    y = np.arange(10) % 2
    np.savez(tmp_path / "v.npz", x=x, y=y)
    assert load_dataset(str(tmp_path / "v.npz")).x.shape == (10, 3)
    np.save(tmp_path / "v.npy", np.hstack([x, y[:, None]]))
    assert load_dataset(str(tmp_path / "v.npy")).n_classes == 2
    (tmp_path / "v.csv").write_text("a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n")
    ds = load_dataset(str(tmp_path / "v.csv"))
    assert ds.classes == ["cat", "dog"] and ds.x.shape == (3, 2)
    (tmp_path / "nolabel.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FileFormatError, match="nolabel.csv: no 'label' column"):
        load_dataset(str(tmp_path / "nolabel.csv"))
    for name, text, match in [
        ("onlylabel.csv", "label\na\nb\n", "non-empty 2-D"),
        ("header.csv", "a,label\n", "no data rows"),
        ("ragged.csv", "a,b,label\n1,2,x\n3,y\n", "differing numbers of columns"),
        ("text.csv", "a,label\nhello,x\n", "non-numeric"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(FileFormatError, match=match):
            load_dataset(str(tmp_path / name))
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(FileFormatError, match=r"flat.npy: expected shape \(N, D\+1\)"):
        load_dataset(str(tmp_path / "flat.npy"))
    np.savez(tmp_path / "names.npz", embeddings=x[:3], labels=np.array(["b", "a", "b"]))
    named = load_dataset(str(tmp_path / "names.npz"))
    assert named.classes == ["a", "b"] and named.y.tolist() == [1, 0, 1]
    np.savez(tmp_path / "nokeys.npz", a=x)
    with pytest.raises(FileFormatError, match="nokeys.npz: needs arrays"):
        load_dataset(str(tmp_path / "nokeys.npz"))
    xn = x.copy()
    xn[2, 1] = np.nan
    np.savez(tmp_path / "nan.npz", x=xn, y=y)
    with pytest.raises(FileFormatError, match="NaN"):
        load_dataset(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "short.npz", x=x, y=y[:4])
    with pytest.raises(FileFormatError, match="labels"):
        load_dataset(str(tmp_path / "short.npz"))
    with pytest.raises(MissingFileError):
        load_dataset(str(tmp_path / "missing.npz"))


def test_splits_are_seeded_disjoint_and_reproducible():
    ds = load_dataset("digits")
    for by in ("class", "sample"):
        tr, te, info = split_dataset(ds, by=by, test_fraction=0.3, seed=3)
        tr2, te2 = apply_split(ds, info)
        assert torch.equal(te.x, te2.x) and len(tr) + len(te) == len(ds)
        _, te3, _ = split_dataset(ds, by=by, test_fraction=0.3, seed=3)
        assert torch.equal(te.y, te3.y)
        if by == "class":
            assert not set(tr.y.tolist()) & set(te.y.tolist())
    tr, te, info = split_dataset(ds, by="class", test_classes=["3", "7"])
    assert sorted(set(te.y.tolist())) == [3, 7]
    with pytest.raises(InputError, match="not in the data"):
        split_dataset(ds, by="class", test_classes=["x"])


def test_sample_split_is_stratified_json_roundtrips_and_warns_on_single_item_classes():
    import json

    y = torch.tensor([0] * 8 + [1] * 12 + [2] * 2)
    ds = Dataset(
        x=torch.rand(22, 3), y=y, classes=["a", "b", "c"], paths=None, kind="vector", name="t"
    )
    with pytest.warns(UserWarning, match="1 test classes have a single item"):
        tr, te, info = split_dataset(ds, by="sample", test_fraction=0.25, seed=1)
    assert torch.bincount(te.y).tolist() == [2, 3, 1]  # per class, at least one left to train
    assert torch.bincount(tr.y).tolist() == [6, 9, 1]
    info2 = json.loads(json.dumps(info))
    with pytest.warns(UserWarning):
        tr2, te2 = apply_split(ds, info2)
    assert torch.equal(te2.x, te.x) and torch.equal(tr2.x, tr.x)
    with pytest.raises(InputError, match="made for 22 items"):
        apply_split(ds.subset(range(20)), info2)
    with pytest.raises(InputError, match="unknown split"):
        split_dataset(ds, by="random")
    with pytest.raises(InputError, match="no predefined"):
        split_dataset(ds, by="predefined")


def test_test_classes_may_name_a_folder_of_classes(tmp_path):
    root = make_image_folder(tmp_path / "alph", n_classes=4, per_class=2, nested=True)
    _, te, info = split_dataset(load_dataset(str(root)), by="class", test_classes=["group1"])
    assert info["test_classes"] == ["group1/class1", "group1/class3"] and len(te) == 4
    assert info["train_classes"] == ["group0/class0", "group0/class2"]


def test_class_split_by_ratio_in_sorted_order(tmp_path):
    root = tmp_path / "ids"
    for i in range(1, 13):  # s1..s12: natural order puts s10..s12 last, not s9
        make_image_folder(root / f"s{i}", n_classes=1, per_class=2, seed=i)
    ds = load_dataset(str(root))
    assert ds.classes[:3] == ["s1/class0", "s2/class0", "s3/class0"]
    _, te, info = split_dataset(ds, by="class", test_fraction=0.25, class_order="sorted")
    assert info["test_classes"] == ["s10/class0", "s11/class0", "s12/class0"]
    assert info["class_order"] == "sorted" and len(te) == 6
    _, _, info_random = split_dataset(ds, by="class", test_fraction=0.25, seed=0)
    assert len(info_random["test_classes"]) == 3
    with pytest.raises(InputError, match="class_order"):
        split_dataset(ds, by="class", class_order="alphabetical")


def test_real_att_faces_and_fashion_mnist_load():
    att = load_dataset(str(shared_data("att_faces")), image_size=(56, 46))
    assert len(att) == 400 and att.n_classes == 40
    tr, te, _ = split_dataset(att, by="class", test_classes=[f"s{i}" for i in range(31, 41)])
    assert len(te) == 100 and len(tr) == 300
    fm = load_dataset(str(shared_data("fashion-mnist")))
    assert len(fm) == 70000 and len(fm.predefined_split["test"]) == 10000


def test_validation_share_holds_at_least_five_classes_when_there_are_many():
    """3 of AT&T's 30 training people saturate MAP@R at once; 5 is the floor (a quarter at most)."""
    from tripletlab.data import Dataset, split_validation

    def toy(n):
        names = [f"s{i}" for i in range(n)]
        return Dataset(torch.zeros(2 * n, 2), torch.arange(n).repeat(2), names, None, "vector", "t")

    assert len(split_validation(toy(30), fraction=0.1)[2]["val_groups"]) == 5
    assert len(split_validation(toy(8), fraction=0.1)[2]["val_groups"]) == 2  # 8 // 4
    assert len(split_validation(toy(200), fraction=0.1)[2]["val_groups"]) == 20
