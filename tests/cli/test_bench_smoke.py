"""Smoke tests of the mining benchmark: table structure, value agreement, skips (no timing)."""

from __future__ import annotations

import importlib.util
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from bench_mining import (
    _run_one,
    compare,
    dense_semihard_loss,
    estimate_gib,
    format_table,
    make_inputs,
    run_benchmark,
)
from tripletlab import TripletLoss

HAS_PML = importlib.util.find_spec("pytorch_metric_learning") is not None


def _spec(impl: str, strategy: str, b: int, **kw) -> dict:
    spec = {"impl": impl, "strategy": strategy, "b": b, "d": 16, "k": 4, "margin": 0.2}
    return {**spec, "repeats": 1, "mem_cap_gib": 8.0, "threads": 1, **kw}


def test_smoke_table_and_agreement(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--sizes", "32", "--repeats", "1", "--threads", "1", "--in-process"]
    code = run_benchmark(argv + ["--json", str(out)] + ([] if HAS_PML else ["--no-pml"]))
    assert code == 0
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("strategy"))
    for col in ("tl s", "peer s", "speedup", "mem frac", "tl/GEMM", "tl/dist", "check"):
        assert col in header
    saved = json.loads(out.read_text())
    assert saved["environment"]["torch"] == torch.__version__
    runs = saved["runs"]
    assert all(r["status"] == "ok" for r in runs), runs
    assert all(r["time_s"] > 0 and math.isfinite(r["loss"]) for r in runs)
    table = saved["table"]
    kinds = {(r["strategy"], r.get("peer")) for r in table}
    assert {("floor-gemm", None), ("floor-dist", None), ("semihard", "dense-tfa")} <= kinds
    # one printed line per table row, after the title (+ a busy-machine note) and the header
    # rule, then a blank line and the column notes
    from bench_mining import COLUMN_NOTES

    lines = printed.strip().splitlines()
    rows = lines[lines.index(header) + 2 :]
    assert rows[len(table)] == "" and rows[len(table) + 1 :] == list(COLUMN_NOTES)
    # the dense TF-Addons reference must agree with tripletlab's semihard (value and gradient)
    dense = next(r for r in table if r.get("peer") == "dense-tfa")
    assert dense["check"] == "loss+grad agree"
    assert dense["vs_gemm"] > 0 and dense["vs_dist"] > 0
    if not HAS_PML:
        pytest.skip("pytorch-metric-learning not installed: pml comparisons not checked")
    checks = {(r["strategy"], r.get("peer")): r.get("check") for r in table}
    assert checks[("all", "pml")] == "loss+grad agree"
    assert checks[("hard", "pml")] == "loss+grad agree"
    assert checks[("semihard", "pml")] == "n/a: different semantics"


def test_subprocess_run_reports_memory():
    res = _run_one(_spec("tripletlab", "hard", 64), timeout=120, in_process=False)
    assert res["status"] == "ok", res
    assert res["extra_mib"] >= 0 and res["time_s"] > 0
    assert len(res["grad"]) == 4 and res["grad"][0] > 0


def test_memory_cap_skips_before_running(tmp_path, capsys):
    out = tmp_path / "skip.json"
    argv = ["--sizes", "2048", "--strategies", "all", "--repeats", "1", "--mem-cap-gib", "0.01"]
    assert run_benchmark(argv + ["--json", str(out)]) == 0
    assert "skipped: would need" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert runs and all(r["status"].startswith("skipped: would need") for r in runs)


def test_estimates_follow_pml_algorithms():
    # pml's vectorised miner holds a B^3 uint8 mask; above B^3 = 2^31 it loops over anchors
    assert estimate_gib("pml", "all", 1024) >= 1.0
    assert estimate_gib("pml", "all", 8192) > 8.0  # skipped under the default cap
    assert estimate_gib("pml", "semihard", 8192) == estimate_gib("pml", "all", 8192)
    assert estimate_gib("tripletlab", "all", 8192) < 2.5
    assert estimate_gib("pml", "hard", 8192) == estimate_gib("tripletlab", "hard", 8192)


def test_bad_usage_exit_code(capsys):
    assert run_benchmark(["--sizes", "4", "--k", "4"]) == 2
    assert run_benchmark(["--no-such-option"]) == 2
    assert "usage" in capsys.readouterr().err


def test_compare_flags_disagreement():
    base = {"status": "ok", "time_s": 1.0, "extra_mib": 10.0, "grad": [1.0, 0.1, 0.2, 0.3]}
    rows = [
        {"strategy": "floor", "impl": "floor-gemm", "b": 8, **base, "loss": 0.0},
        {"strategy": "floor", "impl": "floor-dist", "b": 8, **base, "loss": 0.0},
        {"strategy": "hard", "impl": "tripletlab", "b": 8, **base, "loss": 0.5},
        {"strategy": "hard", "impl": "pml", "b": 8, **base, "loss": 0.6, "time_s": 3.0},
        {"strategy": "all", "impl": "tripletlab", "b": 8, **base, "loss": 0.5},
        {"strategy": "all", "impl": "pml", "b": 8, **base, "loss": 0.5, "grad": [1, 0, 0, 0]},
    ]
    table = compare(rows)
    by = {r["strategy"]: r for r in table}
    assert by["hard"]["check"].startswith("LOSS DIFFERS")
    assert by["hard"]["speedup"] == pytest.approx(3.0)
    assert by["all"]["check"] == "GRADIENT DIFFERS"
    assert "LOSS DIFFERS" in format_table(table)


def _brute_semihard(d: torch.Tensor, labels: torch.Tensor, margin: float) -> float:
    losses = []
    b = len(labels)
    for a in range(b):
        negs = [n for n in range(b) if labels[n] != labels[a]]
        if not negs:
            continue
        for p in range(b):
            if p == a or labels[p] != labels[a]:
                continue
            outside = [float(d[a, n]) for n in negs if d[a, n] > d[a, p]]
            d_an = min(outside) if outside else max(float(d[a, n]) for n in negs)
            losses.append(max(0.0, float(d[a, p]) - d_an + margin))
    return sum(losses) / max(len(losses), 1)


@pytest.mark.parametrize("b,k", [(12, 3), (20, 4), (9, 2)])
def test_dense_reference_is_tf_addons_semihard(b, k):
    x, y, lin = make_inputs(b, 8, k, seed=b)
    e = torch.nn.functional.normalize(lin(x), dim=1).detach().double()
    ref = _brute_semihard(torch.cdist(e, e), y, 0.2)
    assert float(dense_semihard_loss(e, y, 0.2)) == pytest.approx(ref, abs=1e-9)


def test_dense_reference_matches_tripletlab_value_and_gradient():
    x, y, lin = make_inputs(48, 16, 4)
    e = torch.nn.functional.normalize(lin(x), dim=1).double()
    e1 = e.detach().requires_grad_(True)
    e2 = e.detach().requires_grad_(True)
    ours = TripletLoss(strategy="semihard", margin=0.2, reduction="mean")(e1, y)
    ref = dense_semihard_loss(e2, y, 0.2)
    ours.backward()
    ref.backward()
    assert float(ours.detach()) > 0
    assert torch.allclose(ours, ref, atol=1e-10)
    assert torch.allclose(e1.grad, e2.grad, atol=1e-10)


def test_floor_mode_times_every_strategy_against_the_distance_floor(capsys):
    """`--floor`: one row per strategy (and the floor, ratio 1) per size, interleaved timings."""
    from tripletlab.functional import STRATEGIES

    with tempfile.TemporaryDirectory() as tmp:
        tmp_json = Path(tmp) / "floor.json"
        code = run_benchmark(
            [
                "--floor",
                "--sizes",
                "16",
                "--repeats",
                "1",
                "--threads",
                "1",
                "--json",
                str(tmp_json),
            ]
        )
        out = capsys.readouterr().out
        rows = json.loads(tmp_json.read_text())["floor"]
    assert code == 0
    assert "x floor" in out
    ours = {r["strategy"] for r in rows if r["impl"] == "tripletlab"}
    assert ours == set(STRATEGIES)
    floor = [r for r in rows if r["impl"] == "floor-dist"]
    assert len(floor) == 1 and floor[0]["ratio"] == 1.0
    assert all(r["time_s"] > 0 and math.isfinite(r["ratio"]) for r in rows)
    # per call against pml where it ran (B <= 256): tripletlab time / pml time, same strategy
    pml = {r["strategy"]: r["time_s"] for r in rows if r["impl"] == "pml"}
    for r in rows:
        if r["impl"] == "tripletlab" and r["strategy"] in pml:
            assert r["vs_pml"] == pytest.approx(r["time_s"] / pml[r["strategy"]])
    if pml:
        assert "x pml" in out


def test_default_run_measures_default_threads_and_one_thread(tmp_path, capsys):
    """Without --threads, one run gives a table at the default thread count and one at 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = tmp_path / "t.json"
        argv = ["--sizes", "16", "--repeats", "1", "--strategies", "hard", "--in-process"]
        assert run_benchmark(argv + ["--no-pml", "--json", str(out)]) == 0
        assert torch.get_num_threads() == 2  # restored after the 1-thread table
        printed = capsys.readouterr().out
        titles = [line for line in printed.splitlines() if line.startswith("tripletlab bench:")]
        assert len(titles) == 2 and "(2 threads)" in titles[0] and "(1 threads)" in titles[1]
        saved = json.loads(out.read_text())
        assert [r["threads"] for r in saved["by_threads"]] == [2, 1]
        assert {r["threads"] for r in saved["by_threads"][1]["runs"]} == {1}
        assert saved["table"] == saved["by_threads"][0]["table"]
        from bench_mining import thread_counts

        assert thread_counts(3) == [3]
    finally:
        torch.set_num_threads(before)


def test_floor_run_prints_one_table_per_thread_count(capsys):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert run_benchmark(["--floor", "--sizes", "16", "--repeats", "1"]) == 0
        titles = [
            line
            for line in capsys.readouterr().out.splitlines()
            if line.startswith("tripletlab bench --floor:")
        ]
        assert len(titles) == 2 and "(2 threads)" in titles[0] and "(1 threads)" in titles[1]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
