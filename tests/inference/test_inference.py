"""tripletlab.inference.Inference: a trained run as an object (what the CLI and server use)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tripletlab import InputError
from tripletlab.cli import main
from tripletlab.inference import Inference
from tripletlab.inference.embed import embed
from tripletlab.rundir import load_run

from conftest import make_image_folder

FAST = ["--steps", "8", "--eval-every", "4", "--embedding-dim", "8", "--quiet", "--no-report"]


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("inf")
    data = make_image_folder(base / "faces", n_classes=5, per_class=6, size=(16, 12))
    run = base / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--p", "3", "--k", "3"]
    assert main([*args, "--test-classes", "class3,class4", "--val-fraction", "0", *FAST]) == 0
    return run, data


def test_from_run_attributes(image_run):
    run, _ = image_run
    inf = Inference.from_run(run)
    ev = json.loads((run / "eval.json").read_text())
    assert inf.run_dir == run and inf.distance == "cosine"
    assert inf.threshold == pytest.approx(ev["threshold"])
    assert inf.threshold_info["threshold"] == pytest.approx(ev["threshold"])
    assert len(inf.fingerprint) == 64 and inf.config["model"]["embedding_dim"] == 8
    assert not inf.model.training


def test_files_images_and_dataset_embed_like_training(image_run):
    run, data = image_run
    inf = Inference.from_run(run)
    files = sorted(str(p) for p in (data / "class3").iterdir())[:3]
    by_file = inf.embed_files(files)
    # the same pixels through PIL images (e.g. uploads) give the same embeddings
    by_image = inf.embed_images([Image.open(f) for f in files])
    np.testing.assert_allclose(by_file, by_image, atol=1e-6)
    ds = inf.load_data(str(data))
    model, _ = load_run(run)
    np.testing.assert_allclose(inf.embed_dataset(ds), embed(model, ds.x).numpy(), atol=1e-6)
    emb, names = inf.embed_inputs(files)
    assert names == files and np.allclose(emb, by_file)
    with pytest.raises(InputError, match="vectors"):
        inf.embed_vectors(np.zeros((2, 4)))


def test_distances_verify_and_search(image_run, tmp_path):
    run, data = image_run
    inf = Inference.from_run(run)
    files = sorted(str(p) for p in (data / "class3").iterdir())[:2]
    a, b = inf.embed_files(files[:1]), inf.embed_files(files[1:])
    d = inf.distance_between(np.vstack([a, a]), np.vstack([b, a]))
    cos = float((a @ b.T).item() / (np.linalg.norm(a) * np.linalg.norm(b)))
    assert d[0] == pytest.approx(1.0 - cos, abs=1e-6) and d[1] == pytest.approx(0.0, abs=1e-12)
    (res,) = inf.verify(a, b)
    assert res["threshold"] == inf.threshold and res["same"] == (res["distance"] <= inf.threshold)
    assert inf.verify(a, b, threshold=-1.0)[0]["same"] is False
    index = inf.build_index(inf.load_data(str(data)))
    dist, ids = inf.search(index, a, k=3)
    assert dist.shape == ids.shape == (1, 3) and dist[0, 0] == pytest.approx(0.0, abs=1e-5)
    hits = inf.describe_neighbours(index, dist, ids)[0]
    assert hits[0]["path"] == files[0] and hits[0]["label"] == "class3"
    index.save(tmp_path / "idx", fingerprint=inf.fingerprint)
    assert len(inf.load_index(tmp_path / "idx")) == len(index)


def test_vector_model_inputs(tmp_path):
    x = np.random.default_rng(0).normal(size=(120, 6)).astype(np.float32)
    y = np.repeat(np.arange(6), 20)
    np.savez(tmp_path / "v.npz", x=x, y=y)
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "v.npz"), "--out", str(run), "--p", "3", *FAST]
    assert main(args) == 0
    inf = Inference.from_run(run)
    np.save(tmp_path / "q.npy", x[:3])
    emb, names = inf.embed_inputs([str(tmp_path / "q.npy")])
    assert emb.shape == (3, 8) and names[0].endswith("q.npy[0]")
    np.testing.assert_allclose(emb, inf.embed_vectors(x[:3]), atol=1e-6)
    with pytest.raises(InputError, match="model expects"):
        inf.embed_vectors(np.zeros((2, 5)))
    with pytest.raises(InputError, match="vectors"):
        inf.embed_files([str(tmp_path / "q.npy")])
    assert torch.is_tensor(inf.load_data().x)  # the run's own test split
