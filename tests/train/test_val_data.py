"""Validation from another labelled source (--val-data / --val-mode), several training sources
(--data A --data B, --source-ratio), the --equalize preprocessing from training to inference,
and augmented views in the frozen-feature cache (--cached-views)."""

from __future__ import annotations

import json

import pytest
import torch

from tripletlab import InputError
from tripletlab.data.augment import AugmentSpec, preprocess
from tripletlab.inference.run import Inference
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config
from tripletlab.train.feature_cache import view_images

from helpers import make_folder


def people(root, n=5, per_class=4, size=(16, 12)):
    """An image folder of classes p0..p(n-1) (other names than make_folder's c0..)."""
    tmp = make_folder(root.parent / (root.name + "_tmp"), n, per_class, size)
    root.mkdir()
    for i in range(n):
        (tmp / f"c{i}").rename(root / f"p{i}")
    return root


def _cfg(tmp_path, name, **kw):
    base = {
        "out": str(tmp_path / name),
        "steps": 4,
        "eval_every": 2,
        "quiet": True,
        "report": False,
        "embedding_dim": 8,
        "model_options": {"channels": [4, 8]},
        "p": 4,
        "k": 2,
        "threads": 1,
        "augment": "none",
    }
    base.update(kw)
    return resolve_config(overrides=base)


@pytest.fixture
def folders(tmp_path):
    a = make_folder(tmp_path / "att", n_classes=10, per_class=4, size=(16, 12))
    v = people(tmp_path / "yale_val", size=(20, 18))
    return a, v


def test_val_data_joins_validation_and_is_recorded(tmp_path, folders):
    a, v = folders
    t = Trainer(_cfg(tmp_path, "both", data=str(a), val_data=[str(v)]))
    assert {c.split("/")[0] for c in t.val_set.classes[-5:]} == {"yale_val"}
    assert t.val_set.input_shape == t.train_set.input_shape  # resized to the training size
    result = t.fit()
    val = result["validation"]
    assert val["mode"] == "both"
    assert [s["name"] for s in val["sources"]] == ["held-out", "yale_val"]
    assert val["sources"][1] == {
        "name": "yale_val", "spec": str(v), "kind": "val-data", "items": 20, "classes": 5
    }  # fmt: skip
    evals = [
        json.loads(line)
        for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    # the selection metric is the mean of each source's MAP@R
    e = evals[-1]
    assert e["map_at_r"] == pytest.approx((e["map_at_r[held-out]"] + e["map_at_r[yale_val]"]) / 2)
    split = json.loads((tmp_path / "both" / "split.json").read_text())
    assert split["val_sources"][1]["name"] == "yale_val"
    # resumed runs rebuild the same validation set
    again = Trainer(_cfg(tmp_path, "both", data=str(a), val_data=[str(v)]), resume=True)
    assert torch.equal(again.val_set.y, t.val_set.y)


def test_val_mode_only_holds_out_no_training_class(tmp_path, folders):
    a, v = folders
    t = Trainer(_cfg(tmp_path, "only", data=str(a), val_data=[str(v)], val_mode="only"))
    assert t.val_set.classes == [f"yale_val/p{i}" for i in range(5)]
    assert len(t.train_set) + len(t.test_set) == 40  # every AT&T-like item trains or tests
    result = t.fit()
    assert result["validation"]["mode"] == "only" and result["best_step"] in (2, 4)
    assert "threshold" in result  # calibrated on the --val-data pairs


def test_val_data_that_overlaps_training_or_has_no_purpose_is_an_error(tmp_path, folders):
    a, _ = folders
    with pytest.raises(InputError, match="also training classes"):
        Trainer(_cfg(tmp_path, "same", data=str(a), val_data=[str(a)]))
    with pytest.raises(InputError, match="--val-mode"):
        Trainer(_cfg(tmp_path, "mode", data=str(a), val_mode="only"))
    assert not (tmp_path / "same").exists()


def test_two_training_sources_with_a_ratio(tmp_path, folders):
    a, _ = folders
    b = people(tmp_path / "yale", n=6, size=(20, 18))
    lines = []
    t = Trainer(_cfg(tmp_path, "two", data=[str(a), str(b)], source_ratio="1:1"), log=lines.append)
    assert t.train_set.input_shape == (1, 16, 12)  # the first source's size
    sources = {t.val_set.classes[int(y)].split("/")[0] for y in t.val_set.y.unique()}
    assert sources == {"att", "yale"}  # held-out validation classes of each source
    assert any("50% of each batch" in line for line in lines)
    assert any("differ in size" in line for line in lines)
    result = t.fit()
    assert result["steps"] == 4
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["train"]["data"] == [str(a), str(b)]
    # the run's test split reloads from the two sources (tripletlab eval/embed of the run)
    test = Inference.from_run(tmp_path / "two").load_data()
    assert test.classes == t.dataset.classes and torch.equal(test.y, t.test_set.y)
    assert torch.allclose(test.x, t.test_set.x)
    # eval --data on one of the sources counts the images the run trained on (a leak warning)
    split = json.loads((tmp_path / "two" / "split.json").read_text())["test"]
    trained = {c.split("/", 1)[1] for c in split["train_classes"] if c.startswith("yale/")}
    files = sorted(str(f) for f in b.rglob("*.png"))
    want = sum(f.split("/")[-2] in trained for f in files)
    assert 0 < want < len(files)  # some of yale's classes are the run's test classes
    assert Inference.from_run(tmp_path / "two").training_items(None, str(b), files) == want
    with pytest.raises(InputError, match="several training sources"):
        Trainer(_cfg(tmp_path, "one", data=str(a), source_ratio="1:1"))


def test_equalize_is_applied_alike_in_training_and_inference(tmp_path, folders):
    a, _ = folders
    t = Trainer(_cfg(tmp_path, "eq", data=str(a), equalize="clahe"))
    t.fit()
    inf = Inference.from_run(tmp_path / "eq")
    assert inf.equalize == "clahe"
    path = t.test_set.paths[0]
    got = inf.embed_files([path])
    want, _ = t.embed_split(t.test_set.subset([0]))
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)
    # the training images were equalised (not the raw pixels)
    raw = Trainer(_cfg(tmp_path, "raw", data=str(a)))
    assert not torch.allclose(raw.train_set.x, t.train_set.x)
    assert torch.equal(preprocess(raw.train_set.x, "clahe"), t.train_set.x)


@pytest.mark.parametrize("stream", [False, True])
def test_cached_views_equal_the_features_of_the_augmented_images(tmp_path, folders, stream):
    a, _ = folders
    cfg = _cfg(
        tmp_path, f"views{stream}", data=str(a), backbone="mobilenet_v2", image_size=[32, 32],
        model_options={}, freeze_stages="all", feature_blocks=[3], tta="none", stream=stream,
        augment="lighting", cached_views=3, workers=0,
    )  # fmt: skip
    lines = []
    t = Trainer(cfg, log=lines.append)
    result = t.fit()
    f = t.features
    assert f.n_views == 3 and f.views.shape == (2, len(t.train_set), f.train.shape[1])
    assert result["cached_views"] == 3 and any("augmented views" in line for line in lines)
    # view v of item i: the run's augmentation with its seed, embedded directly
    spec = AugmentSpec.from_config("lighting")
    x = t.train_set.x if not stream else torch.stack(
        [t.files[i][0] for i in range(len(t.files))]
    )[[t.files.paths.index(p) for p in t.train_set.paths]]  # fmt: skip
    for v, i in ((1, 0), (2, 5)):
        img = view_images(x[i : i + 1], spec, cfg.seed + 5, v, [i])
        t.model.eval()
        with torch.no_grad():
            direct = t.model.features(img)[0]
        assert torch.allclose(f.views[v - 1, i], direct, atol=1e-4)
    # batches draw from all three views
    b = f.batch(list(range(len(t.train_set))) * 4)
    assert not torch.equal(b, f.train[list(range(len(t.train_set))) * 4])


def test_cached_views_are_bounded_by_cache_mb(tmp_path, folders):
    a, _ = folders
    cfg = _cfg(
        tmp_path, "tight", data=str(a), backbone="mobilenet_v2", image_size=[32, 32],
        model_options={}, freeze_stages="all", feature_blocks=[3], tta="none",
        augment="lighting", cached_views=50, cache_mb=0,
    )  # fmt: skip
    lines = []
    t = Trainer(cfg, log=lines.append)
    t.fit()
    assert t.features.n_views == 1 and any("views fit in --cache-mb 0" in x for x in lines)


@pytest.mark.slow  # optuna's import and a study: ~40 s on a busy 2-core machine
def test_tune_trials_are_scored_on_the_val_data(tmp_path, folders):
    pytest.importorskip("optuna")
    from tripletlab.train.tune import tune

    a, v = folders
    base = {k: v_ for k, v_ in _cfg(tmp_path, "x").to_dict().items() if k in ("model_options",)}
    base.update({"steps": 4, "eval_every": 2, "p": 4, "k": 2, "threads": 1, "augment": "none"})
    base.update({"embedding_dim": 8, "val_data": [str(v)], "val_mode": "only"})
    logs = []
    space = {"margin": {"type": "float", "low": 0.1, "high": 0.3}}
    s = tune(str(a), out=tmp_path / "t", base=base, n_trials=1, folds=2, space=space,
             log=logs.append)  # fmt: skip
    assert s["trials_complete"] == 1 and any("1 fold" in m for m in logs)
    split = json.loads((tmp_path / "t" / "trials" / "0000" / "fold0" / "split.json").read_text())
    assert split["val"] is None and [x["name"] for x in split["val_sources"]] == ["yale_val"]
