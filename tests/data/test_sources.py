"""Several labelled image sources: one data set with classes prefixed by source, validation
drawn per source, validation sources that may not overlap training, PK class weights."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from tripletlab import InputError
from tripletlab.data import Dataset, concat_labelled, split_dataset, split_validation
from tripletlab.data.open import open_data, open_val_data, source_name
from tripletlab.samplers import PKSampler
from tripletlab.train.build import parse_source_ratio

from helpers import make_folder


@pytest.fixture
def two(tmp_path):
    a = make_folder(tmp_path / "att", n_classes=6, per_class=3, size=(20, 16))
    b = make_folder(tmp_path / "yale", n_classes=4, per_class=3, size=(24, 21))
    return a, b


def test_two_sources_open_as_one_prefixed_data_set_of_the_first_size(two):
    a, b = two
    ds, files, notes = open_data([str(a), str(b)])
    assert files is None and len(ds) == 30 and ds.input_shape == (1, 20, 16)
    assert ds.classes[:2] == ["att/c0", "att/c1"] and ds.classes[-1] == "yale/c3"
    assert [s["name"] for s in ds.info["sources"]] == ["att", "yale"]
    assert ds.info["sources"][1]["native_size"] == [24, 21]
    assert any("differ in size" in n and "20x16" in n for n in notes)
    # an explicit size wins, said nowhere; streamed: the same classes, paths only
    ds2, _, notes2 = open_data([str(a), str(b)], image_size=(12, 10))
    assert ds2.input_shape == (1, 12, 10) and not notes2
    ds3, files3, _ = open_data([str(a), str(b)], stream=True)
    assert files3 is not None and ds3.classes == ds.classes and files3.image_size == (20, 16)


def test_one_source_in_a_list_is_the_plain_source(two):
    a, _ = two
    ds, _, _ = open_data([str(a)])
    assert ds.classes[0] == "c0"  # not prefixed: as before


def test_sources_of_the_same_name_or_not_images_are_errors(tmp_path, two):
    a, _ = two
    other = make_folder(tmp_path / "x" / "att", n_classes=2, per_class=2)
    with pytest.raises(InputError, match="two data sources are named 'att'"):
        open_data([str(a), str(other)])
    with pytest.raises(InputError, match="image folder"):
        open_data([str(a), "digits"])
    assert source_name(str(a) + "/") == "att"


def test_validation_is_drawn_per_source(two):
    a, b = two
    ds, _, _ = open_data([str(a), str(b)])
    _, val, info = split_validation(ds, fraction=0.2, seed=3, by_source=True)
    per = Counter(c.split("/")[0] for c in info["test_classes"])
    assert per["att"] >= 1 and per["yale"] >= 1 and info["by_source"]
    # without by_source the draw is the old one (all groups in one pool)
    _, _, old = split_validation(ds, fraction=0.2, seed=3)
    assert "by_source" not in old
    # folds deal each source's classes
    _, _, f0 = split_validation(ds, folds=2, fold=0, by_source=True)
    assert {c.split("/")[0] for c in f0["test_classes"]} == {"att", "yale"}


def people(root, n=4):
    """An image folder of classes p0..p(n-1) (names no other test folder has)."""
    tmp = make_folder(root.parent / (root.name + "_tmp"), n_classes=n, per_class=3, size=(24, 21))
    root.mkdir()
    for i in range(n):
        (tmp / f"c{i}").rename(root / f"p{i}")
    return root


def test_the_test_split_takes_a_share_of_each_source(two):
    a, b = two
    ds, _, _ = open_data([str(a), str(b)])
    _, test, info = split_dataset(ds, test_fraction=0.25, seed=0, by_source=True)
    per = Counter(c.split("/")[0] for c in info["test_classes"])
    assert per == {"att": 2, "yale": 1} and info["by_source"]  # round(6/4), round(4/4)
    _, _, s = split_dataset(ds, test_fraction=0.25, class_order="sorted", by_source=True)
    assert s["test_classes"] == ["att/c4", "att/c5", "yale/c3"]
    # one source (the old call) draws as before
    _, _, old = split_dataset(ds, test_fraction=0.25, seed=0)
    assert "by_source" not in old and len(old["test_classes"]) == 2


def test_val_data_may_not_share_classes_or_files_with_training(tmp_path, two):
    a, b = two
    v = people(tmp_path / "yale_val")
    train, _, _ = open_data(str(a))
    val = open_val_data([str(v)], train.input_shape, train)
    assert val.classes[0] == "yale_val/p0" and val.input_shape == train.input_shape
    assert val.info["val_sources"] == [
        {"name": "yale_val", "spec": str(v), "kind": "val-data", "items": 12, "classes": 4}
    ]
    # b's class names are c0..c3, as a's
    with pytest.raises(InputError, match="also training classes"):
        open_val_data([str(b)], train.input_shape, train)
    renamed = tmp_path / "copy"
    renamed.mkdir()
    for i in range(2):
        (renamed / f"p{i}").symlink_to(a / f"c{i}")
    with pytest.raises(InputError, match="training images too"):
        open_val_data([str(renamed)], train.input_shape, train)
    with pytest.raises(InputError, match="image training data"):
        open_val_data([str(v)], (64,), train)


def test_concat_labelled_keeps_label_spaces_apart():
    a = Dataset(torch.zeros(2, 3), torch.tensor([0, 1]), ["a", "b"], ["p", "q"], "image", "A")
    b = Dataset(torch.ones(2, 3), torch.tensor([1, 0]), ["c", "d"], ["r", "s"], "image", "B")
    ab = concat_labelled([a, b])
    assert ab.y.tolist() == [0, 1, 3, 2] and ab.paths == ["p", "q", "r", "s"]
    with pytest.raises(InputError, match="share class names"):
        concat_labelled([a, a])


def test_pk_class_weights_set_the_share_of_each_group_of_classes():
    y = torch.arange(12).repeat_interleave(4)  # classes 0-7 "source A", 8-11 "source B"
    w = {c: (0.5 / 8 if c < 8 else 0.5 / 4) for c in range(12)}
    s = PKSampler(y, p=4, k=2, seed=0, batches_per_epoch=400, class_weights=w)
    counts = Counter(int(y[i]) < 8 for b in s for i in b[::2])
    assert 0.45 < counts[True] / sum(counts.values()) < 0.55  # 1:1, not 8:4
    plain = list(PKSampler(y, p=4, k=2, seed=0))
    assert plain == list(PKSampler(y, p=4, k=2, seed=0, class_weights=None))  # unchanged
    with pytest.raises(InputError, match="one per class"):
        PKSampler(y, p=4, k=2, class_weights=np.ones(3))


def test_source_ratio_parses_order_and_names():
    assert parse_source_ratio("1:3", ["a", "b"]) == {"a": 0.25, "b": 0.75}
    assert parse_source_ratio("b=1", ["a", "b"]) == {"a": 0.0, "b": 1.0}
    for bad, match in (("1:2:3", "3 weights"), ("x:1", "numbers"), ("c=1", "not sources")):
        with pytest.raises(InputError, match=match):
            parse_source_ratio(bad, ["a", "b"])
