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
