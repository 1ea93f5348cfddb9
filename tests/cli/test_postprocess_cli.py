"""Retrieval post-processing from the command line: chosen at the end of `train`, recorded in
eval.json, overridden with --postprocess, applied by eval, index and search, and refused where
an index and a run disagree."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tripletlab.cli import main

FAST = ["--steps", "12", "--eval-every", "6", "--log-every", "3", "--embedding-dim", "16",
        "--quiet", "--no-report", "--p", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("post") / "auto"
    assert main(["train", "--out", str(run), *FAST]) == 0
    return run


def test_train_chooses_on_validation_and_records_it(auto_run, capsys):
    ev = json.loads((auto_run / "eval.json").read_text())
    post = ev["postprocess"]
    assert post["chosen_by"] == "validation" and post["method"] in (
        "none", "aqe", "dba", "dba+aqe", "rerank")  # fmt: skip
    assert len(post["candidates"]) >= 10 and "rule" in post
    best = max(post["candidates"], key=lambda c: c["gain"])
    assert post["best_candidate"] == best["spec"]
    kept = post["method"] != "none"
    assert kept == (best["gain"] > max(2 * best["gain_se"], 0.001))
    # the test metrics after the choice sit beside the raw ones
    for key in ("precision_at_1", "map_at_r", "r_precision", "recall_at_1"):
        assert 0 <= post[key] <= 1
    if not kept:
        assert post["map_at_r"] == ev["retrieval"]["map_at_r"]


def test_train_with_a_given_postprocess_and_bad_specs(tmp_path, capsys):
    run = tmp_path / "dba"
    assert main(["train", "--out", str(run), "--postprocess", "dba:k=3", *FAST]) == 0
    post = json.loads((run / "eval.json").read_text())["postprocess"]
    assert post["spec"] == "dba:k=3,alpha=3.0" and post["chosen_by"] == "user"
    assert isinstance(post["validation_gain"], float) and "map_at_r" in post
    capsys.readouterr()
    for bad, named in (("blend", "'blend'"), ("dba:k=0", "positive integer"),
                       ("rerank:k9=2", "'k9'")):  # fmt: skip
        assert main(["train", "--out", str(tmp_path / "x"), "--postprocess", bad, *FAST]) == 2
        assert named in capsys.readouterr().err
        assert main(["eval", "--model", str(run), "--postprocess", bad]) == 2
        assert named in capsys.readouterr().err


def test_eval_json_has_raw_and_postprocessed_keys(auto_run, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(auto_run), "--postprocess", "aqe:k=2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["postprocess"]["spec"] == "aqe:k=2,alpha=3.0"
    assert out["postprocess"]["chosen_by"] == "user"
    assert set(out["retrieval"]) >= {"precision_at_1", "map_at_r"}
    assert out["postprocess"]["map_at_r"] != pytest.approx(out["retrieval"]["map_at_r"], abs=0)
    assert main(["eval", "--model", str(auto_run), "--postprocess", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["postprocess"]["map_at_r"] == out["retrieval"]["map_at_r"]
    assert main(["eval", "--model", str(auto_run)]) == 0
    assert "post-processing:" in capsys.readouterr().out


def test_index_records_dba_and_search_refuses_a_run_without_it(auto_run, tmp_path, capsys):
    from sklearn.datasets import load_digits

    idx = tmp_path / "idx"
    args = ["--model", str(auto_run)]
    assert main(["index", *args, "--data", "digits", "--out", str(idx),
                 "--postprocess", "dba:k=3"]) == 0  # fmt: skip
    assert "post-processing dba:k=3,alpha=3.0" in capsys.readouterr().out
    man = json.loads((idx / "manifest.json").read_text())
    assert man["postprocess"] == "dba:k=3,alpha=3.0"
    q = tmp_path / "q.npy"
    np.save(q, (load_digits().data[:3] / 16).astype(np.float32))
    run_choice = json.loads((auto_run / "eval.json").read_text())["postprocess"]["spec"]
    if run_choice != "dba:k=3,alpha=3.0":  # the run's own choice differs: a clear refusal
        assert main(["search", str(q), *args, "--index", str(idx)]) == 1
        err = capsys.readouterr().err
        assert "built with post-processing 'dba:k=3,alpha=3.0'" in err and "--postprocess" in err
    assert main(["search", str(q), *args, "--index", str(idx), "--postprocess", "none"]) == 1
    capsys.readouterr()
    assert main(["search", str(q), *args, "--index", str(idx), "--postprocess", "dba:k=3",
                 "-k", "4", "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 3 and len(res[0]["neighbours"]) == 4


def test_k_beyond_the_gallery_is_clamped_with_a_note(auto_run, tmp_path, capsys):
    idx = tmp_path / "small"
    v, data = tmp_path / "v.npy", tmp_path / "data.npy"  # data: 64 features + a label column
    x = np.random.default_rng(0).random((6, 64)).astype(np.float32)
    np.save(v, x)
    np.save(data, np.hstack([x, np.arange(6, dtype=np.float32)[:, None] % 2]))
    run_spec = json.loads((auto_run / "eval.json").read_text())["postprocess"]["spec"]
    assert main(["index", "--model", str(auto_run), "--data", str(data), "--out", str(idx)]) == 0
    assert json.loads((idx / "manifest.json").read_text())["postprocess"] == run_spec
    capsys.readouterr()
    assert main(["search", str(v), "--model", str(auto_run), "--index", str(idx), "-k", "50",
                 "--json"]) == 0  # fmt: skip
    captured = capsys.readouterr()
    assert "-k 50 is more than the 6 indexed items" in captured.err
    assert all(len(r["neighbours"]) == 6 for r in json.loads(captured.out))


def test_index_refuses_a_gallery_a_server_holds(auto_run, tmp_path, capsys):
    """`tripletlab index --out DIR` takes the gallery lock: a server writing DIR would lose it."""
    from tripletlab.rundir.lock import lock_gallery

    held = lock_gallery(tmp_path / "gal")
    try:
        code = main(["index", "--model", str(auto_run), "--data", "digits", "--out",
                     str(tmp_path / "gal")])  # fmt: skip
        assert code == 1 and "in use by another process" in capsys.readouterr().err
    finally:
        held.close()
    assert main(["index", "--model", str(auto_run), "--data", "digits", "--out",
                 str(tmp_path / "gal")]) == 0  # fmt: skip
