"""Library-first training: your own nn.Module, torch Dataset and loss in the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tripletlab import TripletLoss
from tripletlab.cli import main
from tripletlab.train import Trainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_model.py"


def test_the_documented_example_runs(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert p.returncode == 0, p.stderr
    run = tmp_path / "runs" / "custom-digits"
    p_at_1 = float(p.stdout.split()[-2])
    assert p_at_1 > 0.8  # trained, on held-out items
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["name"] == "custom" and cfg["model"]["class"].endswith("Net")
    assert cfg["train"]["strategy"] == "hard"  # the loss passed in is recorded
    for name in ("eval.json", "metrics.jsonl", "report.html", "checkpoint/state.json"):
        assert (run / name).exists()


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n=120, classes=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(classes, 8, generator=g) * 3
        self.labels = [f"c{i % classes}" for i in range(n)]  # string labels
        self.x = self.centres[[i % classes for i in range(n)]] + torch.randn(n, 8, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.x[i], self.labels[i]


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # not normalised


def test_custom_module_checkpoints_resume_extend_and_cli_message(tmp_path, capsys):
    run = tmp_path / "run"
    kw = dict(train_data=Pairs(), test_data=Pairs(30, seed=1), out=str(run), quiet=True)
    first = Trainer(model=_net(), loss=TripletLoss(margin=0.5, strategy="all"), steps=6, **kw)
    ev = first.fit()
    assert ev["distance"] == "euclidean"  # outputs not L2-normalised -> euclidean
    assert ev["n_items"] == 30 and ev["steps"] == 6
    resumed = Trainer(
        model=_net(), loss=TripletLoss(margin=0.5, strategy="all"), steps=10, resume=True, **kw
    )
    assert resumed.state.step == 6
    assert resumed.fit()["steps"] == 10
    assert main(["eval", "--model", str(run)]) == 1
    err = capsys.readouterr().err
    assert "your own module" in err and "Traceback" not in err


def test_bad_user_data_is_named():
    with pytest.raises(ValueError, match=r"train_data\[0\] must be an \(x, label\) pair"):
        Trainer(model=_net(), train_data=[torch.zeros(8)], steps=2, out="/nonexistent/x")


def test_default_threads_are_measured_recorded_and_reused_on_resume(tmp_path):
    from conftest import make_image_folder

    data = make_image_folder(tmp_path / "imgs", n_classes=6, per_class=4, size=(12, 12))
    notes: list[str] = []
    run = tmp_path / "run"
    kw = dict(data=str(data), out=str(run), steps=2, p=3, k=2, quiet=True, val_fraction=0.0)
    Trainer(threads=1, **{**kw, "out": str(tmp_path / "fixed")})
    rng_fixed = torch.get_rng_state()
    trainer = Trainer(log=notes.append, **kw)
    assert torch.equal(torch.get_rng_state(), rng_fixed)  # the measurement used no randomness
    n = trainer.threads()
    if torch.get_num_threads() > 1:
        assert n in (1, torch.get_num_threads())
        assert any(m.startswith(f"threads: {n} (a step took") for m in notes)
    trainer.fit()
    env = json.loads((run / "config.json").read_text())["environment"]
    assert env["threads"] == (n or torch.get_num_threads())
    notes.clear()
    resumed = Trainer(log=notes.append, resume=True, **{**kw, "steps": 3})
    assert resumed.threads() == env["threads"]
    assert not any(m.startswith("threads:") for m in notes)  # not measured again
