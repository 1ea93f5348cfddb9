"""Validation by class groups, validation-calibrated thresholds and ``tripletlab tune``."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tripletlab.cli import main
from tripletlab.data import Dataset, split_validation
from tripletlab.errors import InputError

pytest.importorskip("optuna")
from tripletlab.train.tune import check_space, tune  # noqa: E402

SRC = str(Path(__file__).resolve().parents[2] / "src")
SMALL = {"steps": {"type": "int", "low": 10, "high": 20, "step": 10}}


def _toy(n_groups=3, per_group=4, items=3) -> Dataset:
    names = [f"g{g}/c{c}" for g in range(n_groups) for c in range(per_group)]
    y = torch.arange(len(names)).repeat_interleave(items)
    return Dataset(torch.rand(len(y), 4), y, names, None, "vector", "toy")


def _vectors(path: Path, n_classes=24, per_class=6, dim=8, seed=0) -> str:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_classes, dim)) * 3
    y = np.repeat(np.arange(n_classes), per_class)
    x = centers[y] + rng.normal(size=(len(y), dim))
    np.savez(path, x=x.astype(np.float32), y=y)
    return str(path)


def test_validation_folds_hold_out_whole_groups():
    ds = _toy()
    seen = []
    for f in range(3):
        train, val, info = split_validation(ds, group_depth=1, folds=3, fold=f, seed=1)
        groups = {c.split("/")[0] for c in info["test_classes"]}
        assert groups == set(info["val_groups"]) and len(groups) == 1
        assert len(info["test_classes"]) == 4  # every class of the group
        train_names = {ds.classes[i] for i in train.y.tolist()}
        assert not train_names & set(info["test_classes"])
        seen += info["val_groups"]
    assert sorted(seen) == ["g0", "g1", "g2"]  # the folds cover every group once


def test_fewer_class_groups_than_folds_is_a_clear_error():
    with pytest.raises(InputError, match="cannot make 5 validation folds from 3 class groups"):
        split_validation(_toy(), group_depth=1, folds=5, fold=0)


def test_threshold_calibrated_on_validation_and_eval_counts_training_items(tmp_path, capsys):
    run = tmp_path / "run"
    data = _vectors(tmp_path / "v.npz")
    assert main(["train", "--data", data, "--steps", "20", "--out", str(run), "--quiet",
                 "--no-report", "--split-by", "class", "--val-fraction", "0.25"]) == 0  # fmt: skip
    ver = json.loads((run / "eval.json").read_text())["verification"]
    # the old trainer took the best threshold of the test pairs themselves
    assert ver["threshold_source"] == "validation"
    assert 0.0 <= ver["validation_far"] <= 1.0 and "in_sample_best_threshold" in ver
    capsys.readouterr()
    assert main(["eval", "--model", str(run), "--data", data]) == 0
    out = capsys.readouterr().out
    split = json.loads((run / "split.json").read_text())
    n_train = 6 * len(split["test"]["train_classes"])
    assert f"WARNING: {n_train} of these 144 items were used in training" in out
    assert "for FAR 0.01 on" in out and "validation identities" in out


@pytest.mark.parametrize(
    "space, match",
    [
        ({"bogus": {"type": "float", "low": 0, "high": 1}}, "unknown option 'bogus'"),
        ({"lr": {"type": "float", "low": 1e-2, "high": 1e-3}}, "empty range"),
        ({"strategy": {"type": "categorical", "choices": []}}, "empty list of choices"),
        ({}, "non-empty"),
        ({"model.bogus": {"type": "float", "low": 0, "high": 1}}, "unknown model option"),
        ({"steps": {"type": "int", "low": 10, "high": 5}}, "empty range"),
        ({"augment": {"type": "categorical", "choices": ["sparkles"]}}, "unknown augment"),
    ],
)
def test_bad_search_space(space, match):
    with pytest.raises(InputError, match=match):
        check_space(space)


def test_zero_budget(tmp_path):
    with pytest.raises(InputError, match="trial budget must be >= 1"):
        tune("digits", out=tmp_path / "t", n_trials=0)
    assert main(["tune", "--out", str(tmp_path / "t2"), "--timeout", "0"]) == 1


def test_tune_fewer_classes_than_folds(tmp_path):
    data = _vectors(tmp_path / "v.npz", n_classes=6)
    base = {"split_by": "class", "test_fraction": 0.5}  # 3 training classes
    with pytest.raises(InputError, match="cannot make 4 validation folds from 3 classes"):
        tune(data, out=tmp_path / "t", base=base, n_trials=1, folds=4, space=SMALL)
    assert not (tmp_path / "t" / "study.db").exists()  # nothing trained, no study left


def test_trial_options_keep_the_base_model_and_start_from_the_base():
    from tripletlab.train.config import TrainConfig
    from tripletlab.train.tune import _base_params, _options

    base_model = {"channels": [16, 32, 64], "pool": "flatten", "tta": {"hflip": True}}
    opts = _options({"width": 2.0, "model.dropout": 0.3, "lr": 1e-3}, "image", 3, base_model)
    assert opts == {
        "lr": 1e-3,
        "model_options": {
            "channels": [32, 64, 128], "pool": "flatten", "tta": {"hflip": True}, "dropout": 0.3
        },
    }  # fmt: skip
    assert base_model["channels"] == [16, 32, 64]  # the base is not modified
    space = {
        "p": {"type": "int", "low": 8, "high": 32, "step": 8},
        "k": {"type": "int", "low": 2, "high": 8, "step": 2},
        "augment": {"type": "categorical", "choices": ["none", "light"]},
        "model.pool": {"type": "categorical", "choices": ["avg", "flatten"]},
        "width": {"type": "categorical", "choices": [0.5, 1.0]},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    }
    first = _base_params(space, TrainConfig(p=12, k=4), 1e-3, "image")
    # p = 12 is off the grid: sampled; unset options take their defaults
    assert first == {"k": 4, "augment": "light", "model.pool": "avg", "width": 1.0, "lr": 1e-3}
    # the embedding size a run without one uses (64), not a sampled one; a backbone's is auto
    space["embedding_dim"] = {"type": "categorical", "choices": [64, 128]}
    assert _base_params(space, TrainConfig(), 1e-3, "image")["embedding_dim"] == 64
    assert "embedding_dim" not in _base_params(space, TrainConfig(backbone="mobilenet_v2"), 1e-3)


def test_tune_first_trial_is_the_base_configuration(tmp_path):
    s = tune("digits", out=tmp_path / "t", base={"steps": 10}, n_trials=1, folds=1,
             space=SMALL, log=lambda m: None)  # fmt: skip
    assert s["trials_complete"] == 1 and s["best_params"] == {"steps": 10}


def test_tune_tiny_budget_and_study_from_other_data(tmp_path):
    out = tmp_path / "t"
    s = tune("digits", out=out, n_trials=2, folds=1, space=SMALL, log=lambda m: None)
    assert s["trials_complete"] == 2 and 0 < s["best_value"] <= 1
    recipe = json.loads((out / "best_recipe.json").read_text())
    assert recipe["_tune"]["budget"]["n_trials"] == 2 and 10 <= recipe["steps"] <= 20
    assert recipe["_tune"]["date"].endswith("Z")
    assert recipe["_tune"]["best_value"] == s["best_value"]
    assert (out / "trials.csv").read_text().count("\n") == 3
    assert "optimization_history" in (out / "tune_report.html").read_text()
    from tripletlab.train.config import load_config_file, resolve_config

    resolve_config(load_config_file(str(out / "best_recipe.json")))  # usable with --config
    other = _vectors(tmp_path / "v.npz")
    with pytest.raises(InputError, match="made on another data set"):
        tune(other, out=out, n_trials=3, folds=1, space=SMALL, resume=True, log=lambda m: None)
    with pytest.raises(InputError, match="already holds a study"):
        tune("digits", out=out, n_trials=3, folds=1, space=SMALL)


def test_tune_killed_mid_trial_then_resume(tmp_path):
    out = tmp_path / "t"
    space = tmp_path / "space.json"
    # one trial long enough (~10 s) to be killed in the middle of it
    space.write_text(json.dumps({"steps": {"type": "int", "low": 1000, "high": 1000}}))
    cmd = [sys.executable, "-m", "tripletlab", "tune", "--out", str(out), "--trials", "1",
           "--folds", "1", "--space", str(space)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": SRC}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        running = 0
        while time.time() < deadline and not running:
            time.sleep(0.3)
            if (out / "study.db").exists():
                try:
                    with sqlite3.connect(out / "study.db") as con:
                        running = con.execute(
                            "select count(*) from trials where state='RUNNING'"
                        ).fetchone()[0]
                except sqlite3.Error:
                    running = 0
        assert running, "no trial started within 120 s"
        time.sleep(0.5)
        assert proc.poll() is None, "the trial ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    res = subprocess.run(cmd + ["--resume", "--json"], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "was interrupted: marked failed" in res.stderr
    summary = json.loads(res.stdout)
    # the killed trial is failed (not counted) and retried: one complete trial, none twice
    assert summary["trials_complete"] == 1 and summary["trials_failed"] == 1


class _Untouchable:
    def __getattr__(self, name):
        raise AssertionError(f"the test split was read during training ({name})")

    def __len__(self):
        raise AssertionError("the test split was read during training (len)")


def test_training_and_selection_never_read_the_test_split(tmp_path):
    from tripletlab.train import Trainer
    from tripletlab.train.config import resolve_config

    cfg = resolve_config(
        overrides={
            "steps": 12,
            "eval_every": 4,
            "patience": 2,
            "quiet": True,
            "report": False,
            "out": str(tmp_path / "r"),
        }  # fmt: skip
    )
    seen = []

    class Seen:
        def on_validate(self, trainer, step, metrics):
            seen.append(step)

    tr = Trainer(cfg, log=lambda *a: None, callbacks=[Seen()])
    tr.test_set = _Untouchable()
    tr.evaluate_test = False
    res = tr.fit()
    assert res["evaluated"] is False and seen and tr.state.best_step in seen
