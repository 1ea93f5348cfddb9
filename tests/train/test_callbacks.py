"""A user's own callbacks in the Trainer: what they see, and STOP."""

import json

from tripletlab.rundir import load_checkpoint
from tripletlab.train import STOP, Trainer


def _options(tmp_path, name="run", **kw):
    return {
        "data": "digits",
        "out": str(tmp_path / name),
        "steps": 40,
        "eval_every": 5,
        "checkpoint_every": 100,
        "quiet": True,
        "report": False,
        "embedding_dim": 16,
        "model_options": {"hidden": [32]},
        "p": 5,
        "k": 4,
        "threads": 1,
        **kw,
    }


class RecordAndStop:
    """Records every hook call; stops at the first validation at or after ``stop_at``."""

    def __init__(self, stop_at: int) -> None:
        self.stop_at = stop_at
        self.started, self.steps, self.validations, self.ended = 0, [], [], []

    def on_start(self, trainer):
        self.started += 1

    def on_step(self, trainer, step, loss, stats):
        self.steps.append(step)

    def on_validate(self, trainer, step, metrics):
        self.validations.append((step, dict(metrics)))
        return STOP if step >= self.stop_at else None

    def on_end(self, trainer, result):
        self.ended.append(result)


def test_a_callback_sees_the_validations_and_stops_the_run(tmp_path):
    cb = RecordAndStop(stop_at=15)
    trainer = Trainer(callbacks=[cb], log=lambda *a: None, **_options(tmp_path))
    result = trainer.fit()
    assert trainer.stopping and trainer.state.step == 15 and result["steps"] == 15
    assert cb.started == 1 and cb.steps == list(range(1, 16))
    assert [step for step, _ in cb.validations] == [5, 10, 15]
    assert all(0 <= m["map_at_r"] <= 1 for _, m in cb.validations)
    # what the callback saw is what metrics.jsonl logged, and the best of it picked the model
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x) for x in lines if '"eval"' in x]
    assert [e["map_at_r"] for e in evals] == [m["map_at_r"] for _, m in cb.validations]
    best = max(m["map_at_r"] for _, m in cb.validations)
    assert trainer.state.best == best
    # stopped: a checkpoint at the stop step (checkpoint_every is 100), the test evaluated once
    _, _, state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 15
    assert cb.ended == [result] and "retrieval" in result


def test_a_stopped_run_resumes_to_the_end(tmp_path):
    Trainer(callbacks=[RecordAndStop(10)], log=lambda *a: None, **_options(tmp_path)).fit()
    cb = RecordAndStop(stop_at=10**9)
    resumed = Trainer(resume=True, callbacks=[cb], log=lambda *a: None, **_options(tmp_path))
    result = resumed.fit()
    assert result["steps"] == 40 and cb.steps == list(range(11, 41))
    assert [step for step, _ in cb.validations] == [15, 20, 25, 30, 35, 40]
