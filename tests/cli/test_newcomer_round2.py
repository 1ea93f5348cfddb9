"""Issue #24, a newcomer's first day: a threshold that holds, any photo folder, help that
says what the program does."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from tripletlab.cli import main
from tripletlab.data.loaders import fit_image
from tripletlab.inference.run import Inference, warn_unlike_training
from tripletlab.metrics.evaluate import degenerate_verification, summary_lines

from conftest import make_image_folder

FAST = ["--steps", "12", "--eval-every", "6", "--threads", "1", "--embedding-dim", "16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("r2")
    data = make_image_folder(base / "faces", n_classes=10, per_class=5, size=(16, 12))
    out = base / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--p", "3", "--k", "3"]
    args += ["--test-classes", "class8,class9", "--val-fraction", "0.3", "--quiet", "--no-report"]
    assert main([*args, *FAST]) == 0
    return out, data


def test_threshold_for_a_target_far_with_interval_and_warning(run, capsys):
    out, data = run
    ver = json.loads((out / "eval.json").read_text())["verification"]
    assert ver["threshold_source"] == "validation" and ver["threshold_rule"] == "target-far"
    assert ver["target_far"] == 0.01 and ver["validation_far"] <= 0.01
    lo, hi = ver["validation_far_ci"]
    assert 0 <= lo <= ver["validation_far"] <= hi <= 1
    assert "identities" in ver["validation_warning"]  # 2-3 validation identities: too few
    assert main(["eval", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    assert "for FAR 0.01 on" in text and "95% interval" in text and "WARNING: the threshold" in text
    a, b = data / "class8" / "img0.png", data / "class9" / "img0.png"
    assert main(["verify", str(a), str(b), "--model", str(out), "--json"]) == 0
    v = json.loads(capsys.readouterr().out)
    assert v["target_far"] == 0.01 and len(v["far_ci"]) == 2 and v["calibration_warning"]


def test_best_accuracy_rule_on_request(tmp_path):
    data = make_image_folder(tmp_path / "f", n_classes=8, per_class=4, size=(16, 12))
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(out), "--p", "3", "--k", "3"]
    args += ["--test-classes", "class6,class7", "--val-fraction", "0.4", "--quiet", "--no-report"]
    assert main([*args, *FAST, "--threshold-rule", "best-accuracy"]) == 0
    ver = json.loads((out / "eval.json").read_text())["verification"]
    assert ver["threshold_rule"] == "best-accuracy" and ver["validation_far_ci"]


def test_eval_on_a_folder_is_not_called_test_and_warns_after_the_table(run, capsys):
    out, data = run
    assert main(["eval", "--model", str(out), "--data", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith(f"data ({data}): 50 items")
    leak = [i for i, s in enumerate(lines) if "used in training" in s]
    assert leak and all(not s.startswith(("retrieval", "verification")) for s in lines[leak[0] :])


def test_unlabelled_photo_folder_embed_index_and_search_a_folder(run, tmp_path, capsys):
    out, data = run
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (30, 24), dtype=np.uint8)).save(photos / f"p{i}.jpg")
    (photos / "more").mkdir()
    Image.fromarray(rng.integers(0, 255, (30, 24), dtype=np.uint8)).save(photos / "more/q.png")
    npz = tmp_path / "e.npz"
    assert main(["embed", "--model", str(out), "--data", str(photos), "--out", str(npz)]) == 0
    z = np.load(npz)
    assert len(z["embeddings"]) == 6 and sorted(z["classes"])[0] == "more/q.png"
    assert {str(z["classes"][y]) for y in z["labels"]} == {f"p{i}.jpg" for i in range(5)} | {
        "more/q.png"
    }
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(out), "--data", str(photos), "--out", str(idx)]) == 0
    capsys.readouterr()
    assert main(["search", str(photos), "--model", str(out), "--index", str(idx), "-k", "1"]) == 0
    text = capsys.readouterr().out
    assert text.count("query:") == 6 and "p3.jpg" in text and "not found" not in text


def test_resize_mode_recorded_and_old_runs_stretch(run, tmp_path):
    out, _ = run
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["resize"] == "crop" and Inference.from_run(out).fit == "crop"
    old = tmp_path / "old"
    old.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (old / f.name).write_bytes(f.read_bytes())
    del cfg["train"]["resize"]
    (old / "config.json").write_text(json.dumps(cfg))
    assert Inference.from_run(old).fit == "stretch"


def test_fit_image_keeps_the_aspect():
    im = Image.new("L", (40, 10))
    im.paste(255, (15, 0, 25, 10))  # a white centre band
    crop = np.asarray(fit_image(im, (10, 10), "crop"))
    assert crop.shape == (10, 10) and crop.mean() > 200  # the centre, not squashed
    pad = np.asarray(fit_image(im, (10, 10), "pad"))
    assert pad[0].max() == 0 and pad[-1].max() == 0  # black bands above and below
    assert np.asarray(fit_image(im, (10, 10), "stretch")).mean() < 100


def test_warning_for_inputs_unlike_the_model():
    with pytest.warns(UserWarning, match="differ a lot"):
        warn_unlike_training([(320, 243)], [1, 56, 46], "crop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unlike_training([(92, 112)], [1, 56, 46], "crop")


def test_degenerate_result_is_flagged():
    v = {"tar_at_threshold": 1.0, "far_at_threshold": 1.0}
    assert "accepts almost every pair" in degenerate_verification(v)
    lines = summary_lines({"verification": v, "n_items": 4}, "run", training=False)
    assert any(s.startswith("WARNING: degenerate") for s in lines)
    assert degenerate_verification({"tar_at_threshold": 0.9, "far_at_threshold": 0.02}) is None


def test_help_texts_say_what_the_program_does(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the images' own size" not in text and "printed as auto:" in text
    for words in ("faces (light", "farthest negative", "centroid (nearest", "alphabets never"):
        assert words in text
    for cmd, words in (
        ("export", "without it the export is not checked"),
        ("verify", "calibrated threshold"),
        ("embed", "plain folder of photos"),
        ("search", "folders of images"),
    ):
        assert main([cmd, "--help"]) == 0
        help_text = " ".join(capsys.readouterr().out.split())
        assert words in help_text, cmd
    assert main(["embed", "--help"]) == 0
    assert "default: the run's test split" not in " ".join(capsys.readouterr().out.split())


def test_report_has_the_threshold_section(run):
    out, _ = run
    assert main(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "Verification threshold" in html and "for FAR 0.01 on" in html
