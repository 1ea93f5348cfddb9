"""The `tripletlab` command, driven in-process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tripletlab.cli import main

from conftest import make_image_folder

FAST = [
    "--steps",
    "12",
    "--eval-every",
    "6",
    "--log-every",
    "3",
    "--embedding-dim",
    "16",
    "--quiet",
    "--no-report",
]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "digits"
    assert main(["train", "--out", str(run), "--p", "5", *FAST]) == 0
    return run


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli_img")
    data = make_image_folder(base / "faces", n_classes=6, per_class=6, size=(16, 12))
    run = base / "run"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--p",
            "3",
            "--k",
            "3",
            "--test-classes",
            "class4,class5",
            "--val-fraction",
            "0",
            *FAST,
        ]
    )
    assert code == 0
    return run, data


def test_help_and_usage_errors(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    for cmd in ("train", "eval", "embed", "index", "search", "verify", "report", "bench"):
        assert main([cmd, "--help"]) == 0
        assert "usage" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["train", "--epochs", "x"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["eval"]) == 2  # --model is required


def test_enumerated_options_are_usage_errors(capsys):
    for flag in ("--strategy", "--distance", "--augment", "--split-by", "--class-order"):
        assert main(["train", flag, "bogus"]) == 2
        assert "invalid choice: 'bogus'" in capsys.readouterr().err
    # --model may also name a local text model folder, so it is checked by the config (exit 1)
    assert main(["train", "--model", "bogus"]) == 1
    err = capsys.readouterr().err
    assert "unknown model 'bogus'" in err and "text model folder" in err


def test_runtime_errors_exit_1_without_traceback(tmp_path, capsys):
    cfg = tmp_path / "bad.json"
    cfg.write_text(json.dumps({"strategy": "bogus"}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err
    assert "error: unknown strategy" in err and "Traceback" not in err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 1
    assert "run directory not found" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "y")]) == 1
    assert "data not found" in capsys.readouterr().err


def test_train_prints_metrics_and_eval_embed(digits_run, tmp_path, capsys):
    assert (digits_run / "eval.json").exists()
    assert main(["eval", "--model", str(digits_run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["retrieval"]["precision_at_1"] <= 1 and "verification" in out
    npz = tmp_path / "e.npz"
    assert main(["embed", "--model", str(digits_run), "--data", "digits", "--out", str(npz)]) == 0
    z = np.load(npz)
    assert z["embeddings"].shape == (1797, 16) and z["labels"].shape == (1797,)
    assert z["paths"].shape == (1797,) and z["paths"][5] == "digits[5]"
    assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, atol=1e-5)
    assert np.allclose(np.linalg.norm(z["embeddings"], axis=1), 1, atol=1e-5)


def test_index_and_search_vectors(digits_run, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(digits_run), "--data", "digits", "--out", str(idx)]) == 0
    from sklearn.datasets import load_digits

    q = tmp_path / "q.npy"
    np.save(q, (load_digits().data[:3] / 16).astype(np.float32))
    capsys.readouterr()
    assert (
        main(
            ["search", str(q), "--model", str(digits_run), "--index", str(idx), "-k", "4", "--json"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert len(res) == 3 and len(res[0]["neighbours"]) == 4
    assert res[0]["neighbours"][0]["distance"] == pytest.approx(0, abs=1e-4)
    assert res[0]["neighbours"][0]["id"] == 0 and res[0]["neighbours"][0]["label"] == "0"
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((2, 5), dtype=np.float32))
    assert main(["search", str(bad), "--model", str(digits_run), "--index", str(idx)]) == 1
    assert "model expects [64]" in capsys.readouterr().err


def test_search_rejects_index_of_another_model(digits_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["train", "--out", str(other), "--p", "5", "--seed", "7", *FAST]) == 0
    idx = tmp_path / "idx2"
    assert main(["index", "--model", str(other), "--data", "digits", "--out", str(idx)]) == 0
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((1, 64), dtype=np.float32))
    capsys.readouterr()
    assert main(["search", str(q), "--model", str(digits_run), "--index", str(idx)]) == 1
    assert "another model" in capsys.readouterr().err


def test_image_run_verify_search_eval_folder_and_report(image_run, tmp_path, capsys):
    run, data = image_run
    a = data / "class4" / "img0.png"
    b = data / "class4" / "img1.pgm"
    c = data / "class5" / "img0.png"
    capsys.readouterr()
    assert main(["verify", str(a), str(b), "--model", str(run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) == {"threshold", "threshold_source", "distance", "pairs"}
    assert len(res["pairs"]) == 1 and res["threshold_source"].startswith("in-sample")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text(f"{a},{b}\n{a},{c}\n")
    assert main(["verify", "--pairs", str(pairs), "--model", str(run), "--threshold", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.count("d=") == 2
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0  # whole folder
    assert "36 items, 6 classes" in capsys.readouterr().out
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(run), "--data", str(data), "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["search", str(a), "--model", str(run), "--index", str(idx), "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert "img0.png" in out and "class4" in out
    assert main(["verify", str(a), "--model", str(run)]) == 2  # usage error (README)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text()
    for name in (
        "training_curves",
        "distance_histograms",
        "embedding_map",
        "retrieval_gallery",
        "roc",
    ):
        assert f"data-plot='{name}'" in html and (run / "plots" / f"{name}.png").exists()


def test_resume_via_cli(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["train", "--out", str(run), "--p", "5", *FAST]) == 0
    assert main(["train", "--out", str(run), "--p", "5", *FAST]) == 1  # would overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--lr", "0.1"]) == 2  # usage error


def test_eval_text_summary(digits_run, capsys):
    assert main(["eval", "--model", str(digits_run)]) == 0
    out = capsys.readouterr().out
    assert "retrieval: precision_at_1=" in out and "verification: ROC AUC=" in out
    assert "trained" not in out


def test_no_eval_trains_on_all_training_items_and_skips_evaluation(tmp_path, capsys):
    run = tmp_path / "noeval"
    assert main(["train", "--out", str(run), "--p", "5", "--no-eval", *FAST]) == 0
    out = capsys.readouterr().out
    assert "evaluation skipped" in out and "test:" not in out
    assert (run / "model.safetensors").exists() and not (run / "eval.json").exists()
    assert not (run / "report.html").exists()
    split = json.loads((run / "split.json").read_text())
    assert split["val"] is None  # no validation share taken from the training items
    saved = json.loads((run / "config.json").read_text())["train"]
    assert saved["evaluate"] is False
    lines = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and not any(rec.get("type") == "eval" for rec in lines)
    # the model is still usable; verify needs an explicit threshold
    assert main(["eval", "--model", str(run), "--json"]) == 0
    assert "retrieval" in json.loads(capsys.readouterr().out)


def test_class_split_by_sorted_ratio_overrides_a_config_list(tmp_path, capsys):
    data = tmp_path / "ids"
    for i in range(1, 9):  # s1..s8, one class each; natural order puts s7, s8 last
        make_image_folder(data / f"s{i}", n_classes=1, per_class=4, size=(8, 8), seed=i)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"test_classes": ["s1"], "val_fraction": 0.0}))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--config", str(cfg), "--out", str(run), "--p", "3"]
    extra = ["--test-classes", "", "--test-fraction", "0.25", "--class-order", "sorted"]
    assert main([*args, *extra, "--no-eval", *FAST]) == 0
    split = json.loads((run / "split.json").read_text())["test"]
    assert split["test_classes"] == ["s7/class0", "s8/class0"]
    assert split["class_order"] == "sorted"


def test_train_flags_are_generated_from_the_config(capsys):
    """Every TrainConfig field meant for the command line is a flag, with its default in the
    help text and the choices of the one table in config.option_choices."""
    import dataclasses

    from tripletlab.train.config import TrainConfig, option_choices

    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("cli", True):
            assert f.metadata.get("flag", "--" + f.name.replace("_", "-")) in text, f.name
    assert "--margin MARGIN triplet margin (default: 0.2)" in text
    assert "--grayscale" not in text and "--eval-batch-size" not in text
    for name in option_choices()["strategy"]:
        assert name in text
    assert "att_faces, att_faces_pretrained, faces, fashion_mnist, omniglot" in text


def test_bench_without_the_benchmark_file_says_where_to_get_it(monkeypatch, capsys):
    """From an installed wheel (no benchmarks/ folder) `tripletlab bench` exits 1 with advice."""
    import sys

    from tripletlab.cli import bench

    monkeypatch.setattr(bench, "_candidates", lambda: [])
    monkeypatch.delitem(sys.modules, "bench_mining", raising=False)
    assert main(["bench", "--quick"]) == 1
    assert "TRIPLETLAB_BENCHMARKS" in capsys.readouterr().err
