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


def test_the_gpu_retrieval_path_equals_the_library_on_cpu():
    """The 1M-item step's torch path (blocked GEMM + topk) gives the library's P@1 and MAP@R."""
    from tripletlab.metrics import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 12
    e = torch.nn.functional.normalize(
        torch.randn(12, 8, generator=g)[y] + torch.randn(600, 8, generator=g), dim=1
    )
    lib = retrieval_metrics(e, y, ks=(1,), distance="euclidean", nmi=False)
    got = gpu_check._retrieval_torch(e, y, 49)
    assert got["precision_at_1"] == pytest.approx(lib["precision_at_1"], abs=1e-9)
    assert got["map_at_r"] == pytest.approx(lib["map_at_r"], abs=1e-6)


def test_mining_and_retrieval_steps_run_on_cpu(tmp_path):
    """The steps' logic, on the CPU at toy sizes (the GPU machine runs the real ones)."""
    res = gpu_check.step_mining(tmp_path, device="cpu", sizes=(32,))
    assert res["ok"]
    ok = [r for r in res["rows"] if r["status"] == "ok"]
    assert {r["impl"] for r in ok} >= {"floor-dist", "tripletlab"}
    assert all(r["time_s"] > 0 and r["x_floor"] > 0 for r in ok)
    ret = gpu_check.step_retrieval(tmp_path, device="cpu", n=2000, classes=20)
    assert ret["ok"] and ret["k"] == 99 and 0 < ret["map_at_r"] <= 1
