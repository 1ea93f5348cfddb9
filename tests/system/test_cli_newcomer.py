"""A newcomer's mistakes, through the real `tripletlab` process: messages and exit codes
(0 ok, 1 runtime error, 2 usage error), never a traceback unless --debug asks for one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_image_folder

TINY = ["--steps", "2", "--embedding-dim", "8", "--p", "3", "--k", "2", "--quiet", "--no-report"]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 180, env: dict | None = None):
    """``python -m tripletlab ARGS`` as a real process: (exit code, stdout, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "tripletlab", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
    )
    return p.returncode, p.stdout, p.stderr


def _config(tmp_path: Path, values: dict) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(values))
    return str(path)


# (config-file values, exit code, words of the message); each once made a traceback or was wrong
BAD_CONFIGS = [
    ({"steps": "ten"}, 1, ["'steps' must be an integer", "'ten'"]),
    ({"margin": "0.2"}, 1, ["'margin' must be a finite number"]),
    ({"image_size": 28}, 1, ["'image_size' must be a list of int"]),
    ({"test_classes": [31, 32]}, 1, ["'test_classes' must be a list of str"]),
    ({"quiet": "yes"}, 1, ["'quiet' must be true or false"]),
    ({"stpes": 10}, 1, ["unknown option 'stpes'"]),
]


@pytest.mark.parametrize("values, code, words", BAD_CONFIGS)
def test_bad_config_values_are_named_without_traceback(tmp_path, values, code, words):
    rc, _, err = run_cli(
        "train", "--config", _config(tmp_path, values), "--out", str(tmp_path / "r")
    )
    assert rc == code, err
    assert "Traceback" not in err
    for w in words:
        assert w in err
    assert not (tmp_path / "r").exists()


def test_test_classes_as_one_string_is_a_comma_list(tmp_path):
    data = make_image_folder(tmp_path / "faces", n_classes=6, per_class=4, size=(8, 8))
    cfg = _config(tmp_path, {"test_classes": "class4, class5", "val_fraction": 0})
    run = tmp_path / "run"
    rc, _, err = run_cli(
        "train", "--data", str(data), "--config", cfg, "--out", str(run), *TINY, "--no-eval"
    )
    assert rc == 0, err
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["test"]["test_classes"]) == ["class4", "class5"]


# (argv, exit code, words of the message)
BAD_COMMAND_LINES = [
    (["verify", "--model", "RUN", "one.png"], 2, ["verify needs two inputs", "got 1"]),
    (["verify", "--model", "RUN"], 2, ["verify needs two inputs"]),
    (["train", "--steps", "ten"], 2, ["invalid int value: 'ten'"]),
    (["train", "--resume", "RUN", "--lr", "0.1"], 2, ["--resume", "'lr'"]),
    (["eval", "--model", "/nonexistent/run"], 1, ["run directory not found"]),
]


@pytest.mark.parametrize("argv, code, words", BAD_COMMAND_LINES)
def test_usage_and_runtime_errors_exit_codes(tmp_path, argv, code, words):
    run = tmp_path / "run"
    rc, _, err = run_cli(*[str(run) if a == "RUN" else a for a in argv])
    assert rc == code, err
    assert "Traceback" not in err
    for w in words:
        assert w in err


def test_debug_works_after_the_subcommand(tmp_path):
    for argv in (
        ["--debug", "eval", "--model", "/nonexistent/run"],
        ["eval", "--model", "/nonexistent/run", "--debug"],
    ):
        rc, _, err = run_cli(*argv)
        assert rc == 1 and "Traceback" in err and "MissingFileError" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_device_cuda_without_cuda_is_a_message(tmp_path):
    rc, _, err = run_cli("train", "--device", "cuda", "--out", str(tmp_path / "r"), *TINY)
    assert rc == 1, err
    assert "Traceback" not in err and "CUDA" in err


# ------------------------------------------------------------------------------ progress


def test_progress_lines_when_stderr_is_not_a_terminal(tmp_path):
    """stderr is a pipe here, as under nohup or CI: lines instead of a silent run."""

    def train(name, *extra):
        args = ["train", "--out", str(tmp_path / name), "--steps", "20", "--log-every", "5"]
        args += ["--embedding-dim", "8", "--p", "5", "--no-report", "--val-fraction", "0"]
        rc, _, err = run_cli(*args, *extra)
        assert rc == 0, err
        assert "\r" not in err  # no bar redrawn into a log file
        return [ln for ln in err.splitlines() if ln.startswith("step ")]

    lines = train("every", "--progress-every", "0")
    assert [ln.split()[1] for ln in lines] == ["5/20", "10/20", "15/20", "20/20"]
    for word in ("loss", "active", "samples/s", "elapsed", "ETA"):
        assert word in lines[0]
    # the default (every 30 s): the first logged step and the last one
    assert [ln.split()[1] for ln in train("default")] == ["5/20", "20/20"]
    assert train("quiet", "--quiet") == []


# ------------------------------------------------------------------- resume and run files

SMALL = ["--embedding-dim", "8", "--p", "5", "--log-every", "5", "--eval-every", "10"]


def test_resume_finished_run_keeps_eval_and_steps_extend_it(tmp_path):
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--out", str(run), "--steps", "20", *SMALL, "--no-report")
    assert rc == 0, err
    before = (run / "eval.json").read_bytes()
    first = json.loads(before)
    assert first["train_time_s"] > 0
    rc, _, err = run_cli("train", "--resume", str(run))
    assert rc == 0, err
    assert "already finished at step 20" in err
    assert (run / "eval.json").read_bytes() == before  # no 0-second re-evaluation
    rc, out, err = run_cli("train", "--resume", str(run), "--steps", "30", "--json")
    assert rc == 0, err
    assert "extended from 20" in err
    ev = json.loads(out)
    assert ev["steps"] == 30 and ev["train_time_s"] > first["train_time_s"]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 30
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30]
    rc, _, err = run_cli("train", "--resume", str(run), "--steps", "10")
    assert rc == 1 and "greater than 30" in err and "Traceback" not in err


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    args = ["train", "--out", str(run), "--steps", "100000", *SMALL, "--progress-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tripletlab", *args, "--no-report", "--checkpoint-every", "100000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # wait for training to run (a progress line)
            if line.startswith("step ") or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert f"tripletlab train --resume {run}" in err
    step = int(err.split("interrupted at step ")[1].split("/")[0])
    assert f"checkpoint at step {step} " in err and step >= 5  # saved at the interrupted step
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == step


def test_failed_start_leaves_no_directory(tmp_path):
    run = tmp_path / "run"
    rc, _, err = run_cli("train", "--out", str(run), "--test-classes", "nosuchclass", *TINY)
    assert rc == 1 and "Traceback" not in err
    assert not run.exists()


def test_run_files_follow_the_umask(tmp_path):
    """Files are created as open() would (0o666 & ~umask), not mkstemp's private 0600."""
    run, idx = tmp_path / "run", tmp_path / "gallery.idx"

    def cli(*args):
        p = subprocess.run(
            [sys.executable, "-m", "tripletlab", *args],
            capture_output=True,
            text=True,
            timeout=180,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=lambda: os.umask(0o027),
        )
        assert p.returncode == 0, p.stderr

    cli("train", "--out", str(run), "--steps", "10", *SMALL)
    cli("index", "--model", str(run), "--data", "digits", "--out", str(idx))
    files = [p for p in [*run.rglob("*"), *idx.rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    assert {"config.json", "model.safetensors", "eval.json", "report.html", "state.json"} <= names
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files}
    assert set(modes.values()) == {"0o640"}, modes


# ---------------------------------------------------------------------------- tensorboard


def test_tensorboard_scalars_and_projector(tmp_path):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rc, _, err = run_cli(
        "train",
        "--out",
        str(run),
        "--steps",
        "20",
        *SMALL,
        "--tensorboard",
        "--no-report",
        "--quiet",
    )
    assert rc == 0, err
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/active_fraction", "train/samples_per_s"} <= tags
    assert {"val/map_at_r", "test/precision_at_1", "test/roc_auc"} <= tags
    logged = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in r]
    assert [e.step for e in acc.Scalars("train/loss")] == logged
    projector = (run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "test' in projector
    meta = next((run / "tensorboard").rglob("metadata.tsv")).read_text().split()
    assert len(meta) == json.loads((run / "eval.json").read_text())["n_items"]


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from tripletlab.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--tensorboard", *TINY]) == 1
    err = capsys.readouterr().err
    assert "pip install 'tripletlab[tensorboard]'" in err and not run.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_progress_bar_on_a_terminal(tmp_path):
    """stderr on a (pseudo-)terminal: the tqdm bar, not the log lines."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns
    args = ["train", "--out", str(tmp_path / "r"), "--steps", "20", *SMALL, "--no-report"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "tripletlab", *args, "--progress-every", "0"],
        stdout=subprocess.DEVNULL,
        stderr=slave,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=180) == 0
    err = b"".join(chunks).decode("utf-8", "replace")
    assert "20/20" in err and ("step/s" in err or "s/step" in err)
    assert not any(ln.startswith("step ") for ln in err.replace("\r", "\n").splitlines())
