"""benchmarks/gpu_check.py without a GPU: the dry run prints the plan (and runs nothing), and the
real run fails loudly instead of skipping."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpu_check

ROOT = Path(__file__).resolve().parents[2]


def test_plan_fits_the_budget_and_names_every_step():
    steps = gpu_check.plan(480)
    assert [s["step"] for s in steps] == ["tests", "mining", "retrieval", "train", "export"]
    assert sum(s["limit_s"] for s in steps) <= 480
    assert all(s["cmd"][-2:] == ["--step", s["step"]] for s in steps)


def test_dry_run_prints_the_plan_and_exits_0(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    for step in ("tests", "mining", "retrieval", "train", "export"):
        assert step in proc.stdout
    assert "nothing was run" in proc.stdout and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_the_check_fails_loudly(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert "GPU CHECK FAILED" in capsys.readouterr().err
    assert not out.exists()


def test_budget_above_8_minutes_is_refused():
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--dry-run", "--budget", "900"])
    assert exc.value.code == 2
