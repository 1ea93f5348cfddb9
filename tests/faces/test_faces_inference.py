"""``Inference`` with faces on (issue #26): images are detected and aligned before embedding;
a pasted AT&T face embeds like its aligned crop, no face is a clear InputError naming the file,
detections are cached per file, the run's config.json ``train.faces`` applies by itself."""

from __future__ import annotations

import numpy as np
import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from PIL import Image

from faces_in_scenes import paste_scene, texture
from tripletlab import InputError
from tripletlab.inference import Inference
from tripletlab.inference.run import check_faces, face_crop_size, run_faces

FAST = ["--steps", "6", "--eval-every", "3", "--embedding-dim", "8", "--quiet", "--no-report"]


@pytest.fixture
def scene_files(tmp_path, att_faces):
    frame, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    face = tmp_path / "scene.png"
    Image.fromarray(frame).save(face)
    empty = tmp_path / "empty.png"
    Image.fromarray(texture(120, 160, np.random.default_rng(3))).save(empty)
    return face, empty


@pytest.mark.filterwarnings("ignore:1 of 1 inputs")
def test_pasted_face_embeds_like_its_aligned_crop(tiny_run, scene_files, tmp_path, mtcnn):
    from tripletlab.faces import detect_and_align

    face, _ = scene_files
    inf = Inference.from_run(tiny_run)
    assert inf.faces is None and inf.use_faces("arcface") == "arcface"
    inf._detector = mtcnn
    (aligned,) = detect_and_align(str(face), size=inf.face_size, faces="largest", detector=mtcnn)
    crop = tmp_path / "crop.png"
    Image.fromarray(aligned.crop.permute(1, 2, 0).numpy()).save(crop)
    with_faces = inf.embed_files([str(face)])
    by_image = inf.embed_images([Image.open(face)])
    emb, names = inf.embed_inputs([str(face)])
    inf.use_faces(None)
    of_crop = inf.embed_files([str(crop)])
    whole = inf.embed_files([str(face)])
    np.testing.assert_allclose(with_faces, of_crop, atol=1e-5)
    np.testing.assert_allclose(by_image, of_crop, atol=1e-5)
    np.testing.assert_allclose(emb, of_crop, atol=1e-5)
    assert names == [str(face)]
    assert not np.array_equal(whole, of_crop)  # the whole frame is another input


def test_no_face_names_the_file_and_detections_are_cached(
    tiny_run, scene_files, mtcnn, monkeypatch
):
    import tripletlab.faces as faces_pkg

    face, empty = scene_files
    inf = Inference.from_run(tiny_run)
    inf.use_faces("head")
    inf._detector = mtcnn
    with pytest.raises(InputError, match=f"no face found in {empty}"):
        inf.embed_files([str(face), str(empty)])
    with pytest.raises(InputError, match="no face found in image 2 of 2"):
        inf.embed_images([Image.open(face), Image.open(empty)])
    first = inf.embed_files([str(face)])
    calls = []
    real = faces_pkg.detect_and_align
    monkeypatch.setattr(
        faces_pkg, "detect_and_align", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    np.testing.assert_allclose(inf.embed_files([str(face)]), first, atol=0)
    assert calls == []  # cached per (path, mtime, size)
    inf.use_faces("arcface")  # another template: detected again
    inf.embed_files([str(face)])
    assert calls == [1]


def test_faces_setting_from_config_and_bad_choice(tiny_run):
    inf = Inference.from_run(tiny_run)
    cfg = {**inf.config, "train": {**inf.config["train"], "faces": "head"}}
    assert Inference(inf.model, cfg, tiny_run).faces == "head"
    assert run_faces(cfg) == "head" and run_faces({"train": {}}) is None
    with pytest.raises(InputError, match="--faces must be one of arcface, head or none"):
        inf.use_faces("dlib")
    assert check_faces("none") is None and inf.use_faces("auto") is None
    assert face_crop_size([16, 12]) == 112 and face_crop_size([160, 128]) == 160
