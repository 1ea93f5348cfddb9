"""``--faces`` on embed, index, search, verify and eval (issue #26): a folder is aligned once
into RUN_DIR/faces_cache, the ids stay the source files, images without a face are counted."""

from __future__ import annotations

import json

import numpy as np
import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from PIL import Image

from faces_in_scenes import texture
from tripletlab.cli import main
from tripletlab.inference import Inference

FAST = ["--steps", "6", "--eval-every", "3", "--embedding-dim", "8", "--quiet", "--no-report"]
pytestmark = pytest.mark.filterwarnings("ignore:.*inputs looked at differ")


@pytest.fixture
def photos(tmp_path, att_faces, mtcnn):
    root = tmp_path / "photos"
    g = write_person_photos(root, att_faces)  # noqa: F405 - from faces_fixtures
    Image.fromarray(texture(120, 160, g)).save(root / "person1" / "empty.png")
    return root


def test_embed_and_index_with_faces(tiny_run, photos, tmp_path, capsys):
    out = tmp_path / "e.npz"
    assert main(["embed", "--model", str(tiny_run), "--data", str(photos), "--out", str(out),
                 "--faces", "arcface"]) == 0  # fmt: skip
    text = capsys.readouterr().out
    assert "wrote 4 embeddings" in text
    assert "faces (arcface): 4 of 5 images with a face, 1 without a face left out" in text
    z = np.load(out)
    paths = sorted(z["paths"].tolist())
    assert paths == sorted(
        str(photos / f"person{c}" / f"img{i}.png") for c in (0, 1) for i in (0, 1)
    )
    # the same embedding as the file with faces on (detected in memory)
    inf = Inference.from_run(tiny_run)
    inf.use_faces("arcface")
    i = z["paths"].tolist().index(paths[0])
    np.testing.assert_allclose(z["embeddings"][i], inf.embed_files([paths[0]])[0], atol=1e-5)
    # a second run uses the cache
    assert main(["embed", "--model", str(tiny_run), "--data", str(photos), "--out", str(out),
                 "--faces"]) == 0  # fmt: skip
    entries = [p for p in (tiny_run / "faces_cache").iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(tiny_run), "--data", str(photos), "--out", str(idx),
                 "--faces", "arcface"]) == 0  # fmt: skip
    assert "indexed 4 items" in capsys.readouterr().out
    q = str(photos / "person0" / "img0.png")
    assert main(["search", q, "--model", str(tiny_run), "--index", str(idx), "-k", "1",
                 "--faces", "arcface", "--json"]) == 0  # fmt: skip
    hits = json.loads(capsys.readouterr().out)
    assert json.dumps(hits).count(q) >= 1  # the query itself is its nearest item
    # a query folder: its images without a face are skipped with a note
    argv = ["search", str(photos), "--model", str(tiny_run), "--index", str(idx), "-k", "1"]
    assert main([*argv, "--faces", "arcface", "--json"]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 4
    assert f"note: no face found in {photos / 'person1' / 'empty.png'}: skipped" in out.err
    empty = str(photos / "person1" / "empty.png")
    assert main(["search", empty, "--model", str(tiny_run), "--index", str(idx),
                 "--faces"]) == 1  # fmt: skip
    assert f"no face found in {empty}" in capsys.readouterr().err
    # the index records --faces: queries embedded otherwise are refused, never silently wrong
    assert json.loads((idx / "manifest.json").read_text())["faces"] == "arcface"
    assert main(["search", q, "--model", str(tiny_run), "--index", str(idx),
                 "--faces", "none"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert "built from --faces arcface" in err and "whole images" in err


def test_verify_and_eval_with_faces(tiny_run, photos, capsys):
    a, b = photos / "person0" / "img0.png", photos / "person0" / "img1.png"
    argv = ["verify", str(a), str(b), "--model", str(tiny_run), "--threshold", "0.5"]
    assert main([*argv, "--faces", "head", "--json"]) == 0
    capsys.readouterr()
    empty = photos / "person1" / "empty.png"
    assert (
        main(
            [
                "verify",
                str(a),
                str(empty),
                "--model",
                str(tiny_run),
                "--threshold",
                "0.5",
                "--faces",
            ]
        )
        == 1
    )
    assert f"no face found in {empty}" in capsys.readouterr().err
    assert (
        main(
            [
                "verify",
                str(a),
                str(empty),
                "--model",
                str(tiny_run),
                "--faces",
                "none",
                "--threshold",
                "0.5",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["eval", "--model", str(tiny_run), "--data", str(photos), "--faces", "arcface",
                 "--json"]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out)
    assert res["faces"]["no_face"] == 1 and res["faces"]["with_face"] == 4
    assert main(["eval", "--model", str(tiny_run), "--faces", "arcface", "--json"]) == 0
    assert "note: --faces applies to --data" in capsys.readouterr().err
    assert main(["eval", "--model", str(tiny_run), "--faces", "dlib"]) == 2
    assert "--faces must be one of" in capsys.readouterr().err
