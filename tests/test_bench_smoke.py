"""A tiny smoke run of the benchmark: the table is produced and the values agree (no timing)."""

from __future__ import annotations

import json

import pytest

from tripletlab.bench import _dense_tfa_semihard, _inputs, run_benchmark


def test_bench_smoke_table_and_agreement(tmp_path, capsys):
    pytest.importorskip("pytorch_metric_learning", reason="pytorch-metric-learning not installed")
    out = tmp_path / "b.json"
    code = run_benchmark(["--sizes", "32", "--repeats", "1", "--json", str(out), "--threads", "1"])
    assert code == 0
    table = capsys.readouterr().out
    assert "peer/tl time" in table and "tl/GEMM" in table
    rows = json.loads(out.read_text())["rows"]
    impls = {(r["strategy"], r["impl"]) for r in rows}
    assert ("all", "pml") in impls and ("semihard", "dense-tfa") in impls
    assert all(r["status"] == "ok" for r in rows), rows
    agree = [r["agree"] for r in rows if r.get("agree") and "semantics" not in r["agree"]]
    assert agree and all(a == "loss agrees" for a in agree)


def test_memory_cap_skips_instead_of_crashing(capsys):
    code = run_benchmark(
        ["--sizes", "2048", "--strategies", "all", "--repeats", "1", "--mem-cap-gib", "0.01"]
    )
    assert code == 0
    assert "skipped: would need" in capsys.readouterr().out


def test_dense_reference_matches_tripletlab_semihard():
    import torch

    from tripletlab import TripletLoss

    x, y, lin = _inputs(48, 16, 4)
    e = torch.nn.functional.normalize(lin(x), dim=1)
    ours = TripletLoss(strategy="semihard", margin=0.2, reduction="mean")(e, y)
    assert torch.allclose(ours, _dense_tfa_semihard(e, y, 0.2), atol=1e-6)
