"""Early stopping on by default with a patience chosen from the run length, and the note when
the loss and active fraction stay ~0 (issue #24)."""

from __future__ import annotations

import json

from tripletlab.train import Trainer
from tripletlab.train.build import auto_patience
from tripletlab.train.callbacks import IdleWatch


def test_auto_patience_from_the_run_length():
    assert auto_patience(600, 4) == 37  # AT&T's README run: 150 validations
    assert auto_patience(1900, 100) == 0  # 19 validations: too few to tell a plateau
    assert auto_patience(2000, 100) == 10 and auto_patience(8000, 100) == 20
    assert auto_patience(100, 10) == 0 and auto_patience(600, 4, validated=False) == 0


def test_default_run_prints_and_records_its_patience(tmp_path):
    lines: list[str] = []
    trainer = Trainer(
        data="digits", steps=40, eval_every=2, quiet=True, report=False, threads=1,
        embedding_dim=8, out=str(tmp_path / "run"), log=lines.append,
    )  # fmt: skip
    assert trainer.cfg.patience == 10
    assert any(s.startswith("auto: early stopping after 10 validations") for s in lines)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["train"]
    assert saved["patience"] == 10
    off = Trainer(
        data="digits", steps=40, eval_every=2, patience=0, quiet=True, report=False,
        threads=1, embedding_dim=8, out=str(tmp_path / "off"), log=lambda *_: None,
    )  # fmt: skip
    assert off.cfg.patience == 0


class _State:
    best_step = 30


class _Cfg:
    patience = 12


class _Trainer:
    total_steps, is_main, state, cfg = 200, True, _State(), _Cfg()

    def __init__(self):
        self.lines: list[str] = []

    def log(self, line: str) -> None:
        self.lines.append(line)


def test_idle_note_once_after_a_long_flat_stretch():
    t, w = _Trainer(), IdleWatch()
    w.on_start(t)
    for step in range(1, 40):
        w.on_step(t, step, 0.1, {"active_fraction": 0.3})  # learning
    for step in range(40, 200):
        w.on_step(t, step, 0.0, {"active_fraction": 0.0})
    assert len(t.lines) == 1
    assert "~0 since step" in t.lines[0] and 40 < w.since < 100
    assert "best validation step so far 30" in t.lines[0]
    assert "early stopping after 12" in t.lines[0]
    t2, w2 = _Trainer(), IdleWatch()
    w2.on_start(t2)
    for step in range(1, 200):  # a loss of ~0 interrupted every 30 steps: no note
        w2.on_step(t2, step, 0.0 if step % 30 else 0.2, {"active_fraction": 0.0})
    assert t2.lines == []
    t3, w3 = _Trainer(), IdleWatch()
    w3.on_start(t3)
    for step in range(1, 200):  # ~0, with a stray 0.0002 loss now and then: the note
        w3.on_step(t3, step, 0.0002 if step % 25 == 0 else 0.0, {"active_fraction": 0.0})
    assert len(t3.lines) == 1
