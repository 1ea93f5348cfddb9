"""``tripletlab train --faces`` (issue #26): the folder is aligned once into RUN_DIR/faces/,
the run trains on it, records ``faces`` in config.json and applies it by itself at inference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from faces_fixtures import write_training_photos
from PIL import Image

from tripletlab.cli import main
from tripletlab.inference import Inference
from tripletlab.train.config import load_config_file, resolve_config

FAST = ["--steps", "6", "--eval-every", "3", "--embedding-dim", "8", "--no-report"]
pytestmark = pytest.mark.filterwarnings("ignore:.*inputs looked at differ")


@pytest.fixture(scope="module")
def face_run(tmp_path_factory, att_faces):
    base = tmp_path_factory.mktemp("faces_train")
    root = base / "photos"
    write_training_photos(root, att_faces)
    run = base / "run"
    args = ["train", "--data", str(root), "--out", str(run), "--p", "2", "--k", "2"]
    return run, root, [*args, "--test-classes", "person3", "--val-fraction", "0", *FAST]


def test_train_with_faces_records_and_applies_it(face_run, mtcnn, capsys):
    run, root, argv = face_run
    assert main([*argv, "--faces", "arcface"]) == 0
    err = capsys.readouterr().err
    summary = json.loads((run / "faces" / ".summary.json").read_text())
    assert summary["no_face"] >= 1 and summary["with_face"] + summary["no_face"] == 13
    line = (f"faces (arcface): {summary['faces_written']} faces in 13 images of {root}, "
            f"{summary['no_face']} without a face left out")  # fmt: skip
    assert line in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["faces"] == "arcface" and cfg["train"]["data"] == str(root)
    assert (run / "faces" / "person0" / "img0.png").is_file()
    inf = Inference.from_run(run)
    assert inf.faces == "arcface"  # applied by itself
    inf._detector = mtcnn
    scene = root / "person0" / "img0.png"
    by_scene = inf.embed_files([str(scene)])
    inf.use_faces("none")
    np.testing.assert_allclose(
        by_scene, inf.embed_files([str(run / "faces" / "person0" / "img0.png")]), atol=1e-5
    )
    # the run's own test split is read from RUN_DIR/faces (no second alignment)
    inf.use_faces("auto")
    test = inf.load_data()
    assert test.paths and all(str(root) in p for p in test.paths)
    assert main(["eval", "--model", str(run), "--json"]) == 0
    assert not (run / "faces_cache").exists()


def test_faces_option_is_checked(tmp_path, capsys):
    from tripletlab import InputError

    with pytest.raises(InputError, match="unknown faces 'dlib'"):
        resolve_config(overrides={"faces": "dlib"})
    assert main(["train", "--faces", "dlib", "--out", str(tmp_path / "r")]) == 2
    capsys.readouterr()
    # digits are no image folder
    assert main(["train", "--faces", "head", "--out", str(tmp_path / "r"), *FAST]) == 1
    assert "--faces needs image folders (ROOT/<class>/<image>) as --data" in capsys.readouterr().err


def test_faces_with_several_sources_and_val_data(face_run, tmp_path, capsys):
    """``--data A --data B --val-data V --faces``: each source aligned into
    RUN_DIR/faces/<name>/ (its classes keep their names), the validation folder into
    RUN_DIR/faces/val/<name>/ and validated on aligned like the training faces."""
    _, root, _ = face_run
    a, b, v = tmp_path / "src_a", tmp_path / "src_b", tmp_path / "val_v"
    people = sorted(p.name for p in root.iterdir())
    for dst, names in ((a, people[:2]), (b, people[2:3]), (v, people[3:])):
        for n in names:
            shutil.copytree(root / n, dst / n)
    run = tmp_path / "run2"
    argv = ["train", "--data", str(a), "--data", str(b), "--val-data", str(v),
            "--val-mode", "only", "--test-fraction", "0.34", "--test-classes", f"src_a/{people[0]}",
            "--out", str(run), "--p", "2", "--k", "2", "--faces", "head", *FAST]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    for src, out in ((a, run / "faces" / "src_a"), (b, run / "faces" / "src_b"),
                     (v, run / "faces" / "val" / "val_v")):  # fmt: skip
        assert (out / ".summary.json").is_file() and f"images of {src}," in err
        assert list(out.rglob("*.png"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["data"] == [str(a), str(b)] and cfg["train"]["val_data"] == [str(v)]
    ev = json.loads((run / "eval.json").read_text())
    assert "val_v" in json.dumps(ev.get("validation", ev))  # the aligned source kept its name


def test_faces_auto_aligns_photos_and_leaves_face_crops(face_run, tmp_path, capsys):
    """``--faces auto`` (the faces recipe's default): photos (a face well under a quarter of
    the image) are aligned with arcface, face crops are left alone; config.json records the
    decision, so inference applies the same."""
    from tripletlab.faces import looks_like_photos

    _, root, argv = face_run
    photos, facts = looks_like_photos(root)
    assert photos and facts["with_face"] >= facts["sampled"] // 2 and facts["median_area"] < 0.25
    run = tmp_path / "auto_photos"
    assert main([*argv[:3], "--out", str(run), *argv[5:], "--faces", "auto"]) == 0
    err = capsys.readouterr().err
    assert "auto: --faces arcface (" in err and "photos" in err
    assert json.loads((run / "config.json").read_text())["train"]["faces"] == "arcface"
    crops = tmp_path / "crops"  # the aligned faces of that run are face crops
    shutil.copytree(run / "faces", crops, ignore=shutil.ignore_patterns(".*"))
    run2 = tmp_path / "auto_crops"
    assert (
        main(["train", "--data", str(crops), "--out", str(run2), *argv[5:], "--faces", "auto"]) == 0
    )
    assert "auto: --faces off (" in capsys.readouterr().err
    assert json.loads((run2 / "config.json").read_text())["train"]["faces"] is None
    assert not (run2 / "faces").exists()
    assert resolve_config(load_config_file("faces")).faces == "auto"


def test_face_size_sets_the_aligned_crop_in_training_and_inference(face_run, tmp_path, capsys):
    """``--face-size 32``: the training faces are aligned at 32x32, config.json records it and
    inference aligns queries at the same size (the embedding of a photo equals that of its
    training crop); a bad size exits 2 or 1 with the option named."""
    _, root, argv = face_run
    run = tmp_path / "small"
    args = [*argv[:3], "--out", str(run), *argv[5:], "--faces", "arcface", "--face-size", "32"]
    assert main(args) == 0
    capsys.readouterr()
    crop = run / "faces" / "person0" / "img0.png"
    assert Image.open(crop).size == (32, 32)
    assert json.loads((run / "config.json").read_text())["train"]["face_size"] == 32
    inf = Inference.from_run(run)
    assert inf.face_size == 32
    by_photo = inf.embed_files([str(root / "person0" / "img0.png")])
    inf.use_faces("none")
    np.testing.assert_allclose(by_photo, inf.embed_files([str(crop)]), atol=1e-5)
    for bad in ("8", "x"):
        assert main([*args[:-1], bad, "--out", str(tmp_path / f"bad{bad}")]) in (1, 2)
        assert "face" in capsys.readouterr().err
