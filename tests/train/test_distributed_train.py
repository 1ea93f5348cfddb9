"""`tripletlab train --distributed` under torchrun (gloo, CPU, 127.0.0.1, bounded timeouts).

Equality with one process on the same global batch, the errors of bad launches, and a SIGKILLed
rank: the others stop within the timeout and the last checkpoint resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tripletlab
from tripletlab import InputError
from tripletlab.cli import main
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config

from helpers import free_port, subprocess_env

SRC = str(Path(tripletlab.__file__).resolve().parents[1])
COMMON = ["--embedding-dim", "16", "--p", "5", "--k", "4", "--quiet", "--no-report"]


_free_port = free_port


def _torchrun(n: int, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "tripletlab", "train", "--distributed", *args,
    ]  # fmt: skip


_env = subprocess_env


def _model(run: Path) -> dict:
    return {
        k: v
        for k, v in load_file(str(run / "checkpoint" / "state.safetensors")).items()
        if k.startswith("model.")
    }


@pytest.mark.parametrize("hidden", [[], [32]], ids=["linear", "batchnorm"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, hidden):
    """50 steps, 2 gloo processes (10 items each) == 1 process on the 20-item global batch.

    ``batchnorm``: an MLP with BatchNorm, whose statistics are those of the global batch
    (``GlooSyncBatchNorm``), running statistics included."""
    recipe = tmp_path / "model.json"
    recipe.write_text(json.dumps({"model_options": {"hidden": hidden}}))
    args = ["--data", "digits", "--steps", "50", "--no-eval", "--seed", "3", *COMMON]
    args += ["--config", str(recipe)]
    proc = subprocess.run(
        _torchrun(2, [*args, "--out", str(tmp_path / "two")]),
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    two, one = _model(tmp_path / "two"), _model(tmp_path / "one")
    assert two.keys() == one.keys()
    # a Linear bias right before BatchNorm has gradient 0 in exact arithmetic: Adam turns its
    # rounding noise into steps of size lr in either run, so it is not comparable (and has no
    # effect on the output); nor is the running mean, an average of that bias's history
    if hidden:
        for w in (one, two):
            del w["model.body.0.bias"], w["model.body.1.running_mean"]
    for k in one:
        assert torch.allclose(two[k], one[k], atol=1e-5, rtol=1e-4), (
            k,
            float((two[k] - one[k]).abs().max()),
        )
    logs = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(logs[-1])["step"] == 50  # rank 0 alone logged: one line per step logged


def test_distributed_without_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    code = main(["train", "--distributed", "--out", str(tmp_path / "r"), *COMMON])
    assert code == 1
    assert "torchrun --nproc_per_node" in capsys.readouterr().err


def test_world_size_that_does_not_divide_the_batch_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        _torchrun(3, ["--out", str(tmp_path / "r"), "--steps", "2", *COMMON]),
        env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "does not divide into 3 processes" in proc.stderr


def test_memory_smaller_than_the_global_batch_is_an_error(tmp_path):
    cfg = resolve_config(
        overrides={"out": str(tmp_path / "r"), "p": 5, "k": 4, "memory_size": 8, "quiet": True}
    )
    with pytest.raises(InputError, match="smaller than the batch"):
        Trainer(cfg)


def _worker_pids(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith(b"RANK="):
                out[int(item[5:])] = int(d.name)
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker pids")
def test_sigkill_of_one_rank_stops_the_others_and_the_checkpoint_resumes(tmp_path):
    run = tmp_path / "r"
    args = ["--out", str(run), "--steps", "100000", "--checkpoint-every", "10", "--no-eval"]
    args += ["--dist-timeout", "20", "--memory-size", "40", "--memory-warmup", "5", *COMMON]
    proc = subprocess.Popen(
        _torchrun(2, args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.time() + 150
        metrics = run / "metrics.jsonl"
        while time.time() < deadline:  # wait for a checkpoint after step 0
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.5)
        pids = _worker_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)  # bounded: the survivors must stop
        stopped_after = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert stopped_after < 45
    assert "rank" in err.lower() and ("1" in err), err[-3000:]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 10
    # the last checkpoint resumes (a short extension keeps the test bounded)
    saved = json.loads((run / "config.json").read_text())
    saved["train"]["steps"] = state["step"] + 4
    (run / "config.json").write_text(json.dumps(saved))
    proc = subprocess.run(
        _torchrun(2, ["--resume", str(run), "--quiet"]),
        env=_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed {run} at step {state['step']}" in proc.stdout + proc.stderr


def test_hard_class_sampler_agrees_across_ranks(tmp_path):
    """--sampler hard-class under 2 gloo processes: rank 0 computes the neighbour table and
    broadcasts it, so the global batches (and the weights) equal one process's."""
    recipe = tmp_path / "model.json"
    recipe.write_text(json.dumps({"model_options": {"hidden": []}}))
    args = ["--data", "digits", "--steps", "24", "--no-eval", "--seed", "3", *COMMON]
    args += [
        "--config",
        str(recipe),
        "--sampler",
        "hard-class",
        "--hard-class-every",
        "8",
        "--hard-class-group",
        "2",
    ]
    proc = subprocess.run(
        _torchrun(2, [*args, "--out", str(tmp_path / "two")]),
        env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    two, one = _model(tmp_path / "two"), _model(tmp_path / "one")
    for k in one:
        assert torch.allclose(two[k], one[k], atol=1e-5, rtol=1e-4), k
    state = [
        json.loads((tmp_path / r / "checkpoint" / "state.json").read_text()) for r in ("one", "two")
    ]
    assert state[0]["sampler"]["neighbours"] == state[1]["sampler"]["neighbours"]
    assert state[0]["sampler"]["refreshed_at"] == 16


def test_streamed_images_train_under_two_processes(tmp_path):
    """Streamed image batches (DataLoader over the sharded PK sampler) under 2 gloo processes,
    with hard-class refreshes that reopen the stream; the run finishes and resumes."""
    from helpers import make_folder

    root = make_folder(tmp_path / "imgs", n_classes=5, per_class=6, size=(12, 12))
    run = tmp_path / "run"
    args = ["--data", str(root), "--stream", "--workers", "1", "--image-size", "12", "12",
            "--threads", "1", "--p", "4", "--k", "2", "--no-eval", "--quiet", "--no-report",
            "--split-by", "sample", "--sampler", "hard-class", "--hard-class-every", "3",
            "--hard-class-group", "2", "--checkpoint-every", "4", "--out", str(run)]  # fmt: skip
    proc = subprocess.run(
        _torchrun(2, [*args, "--steps", "8"]), env=_env(), capture_output=True, text=True,
        timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 8 and state["sampler"]["refreshed_at"] == 6
    proc = subprocess.run(
        _torchrun(2, ["--resume", str(run), "--steps", "10", "--quiet"]), env=_env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == 10


def _weights_bytes(run: Path) -> bytes:
    t = _model(run)
    return b"".join(k.encode() + t[k].numpy().tobytes() for k in sorted(t))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the worker pids")
@pytest.mark.parametrize("stream", [False, True], ids=["in-memory", "streamed"])
def test_a_killed_rank_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path, stream):
    """Issue #25 row 8: 2 gloo processes on images (per-rank augmentation draws; streamed:
    data workers per rank). SIGKILL one rank after the checkpoint at step >= 10, resume with
    --resume: the final weights are byte-identical to a run that never stopped."""
    from helpers import make_folder

    root = make_folder(tmp_path / "imgs", n_classes=6, per_class=8, size=(16, 16), rgb=True)
    args = ["--data", str(root), "--steps", "40", "--checkpoint-every", "10", "--no-eval",
            "--seed", "5", "--threads", "1", "--dist-timeout", "20", "--split-by", "sample",
            *COMMON]  # fmt: skip
    if stream:
        args += ["--stream", "--workers", "1"]
    full = subprocess.run(
        _torchrun(2, [*args, "--out", str(tmp_path / "full")]),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "cut"
    proc = subprocess.Popen(
        _torchrun(2, [*args, "--out", str(run)]),
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    state_json = run / "checkpoint" / "state.json"
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # the first checkpoint after step 0
            try:
                if json.loads(state_json.read_text())["step"] >= 10:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.02)
        pids = _worker_pids(proc.pid)
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGKILL)
        proc.communicate(timeout=90)  # bounded: the survivor stops within --dist-timeout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    step = json.loads(state_json.read_text())["step"]
    assert 10 <= step < 40, step  # killed at a checkpoint before the end
    resumed = subprocess.run(
        _torchrun(2, ["--resume", str(run), "--quiet"]),
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {run} at step {step}" in resumed.stdout + resumed.stderr
    assert _weights_bytes(run) == _weights_bytes(tmp_path / "full")
