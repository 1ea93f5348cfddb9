"""One default distance everywhere, correct loss statistics, readable objects, search hints."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from tripletlab import TripletLoss
from tripletlab.data import load_dataset
from tripletlab.functional import STRATEGIES
from tripletlab.index import EmbeddingIndex
from tripletlab.inference import Inference
from tripletlab.metrics import (
    few_shot_accuracy,
    knn_search,
    pair_distances,
    retrieval_metrics,
    verification_metrics,
)
from tripletlab.models import build_model

from conftest import make_image_folder


def test_every_metric_and_the_index_default_to_cosine():
    for fn in (
        retrieval_metrics,
        knn_search,
        few_shot_accuracy,
        verification_metrics,
        pair_distances,
    ):
        assert inspect.signature(fn).parameters["distance"].default == "cosine", fn.__name__
    assert inspect.signature(EmbeddingIndex).parameters["metric"].default == "cosine"


def _brute_positive_pairs(y, ref_y, exclude_self):
    return sum(
        1
        for a in range(len(y))
        for p in range(len(ref_y))
        if y[a] == ref_y[p] and not (exclude_self and a == p)
    )


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_n_positive_pairs_for_every_strategy(strategy):
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 4])  # a singleton class too
    emb = torch.nn.functional.normalize(torch.randn(len(y), 5, generator=g), dim=1)
    loss = TripletLoss(strategy=strategy, seed=0)
    loss(emb, y)
    assert loss.stats["n_positive_pairs"] == _brute_positive_pairs(y.tolist(), y.tolist(), True)
    bank_y = torch.tensor([0, 1, 1, 5, 3])  # against a memory bank: no self-exclusion
    bank = torch.nn.functional.normalize(torch.randn(len(bank_y), 5, generator=g), dim=1)
    loss(emb, y, ref_embeddings=bank, ref_labels=bank_y)
    assert loss.stats["n_positive_pairs"] == _brute_positive_pairs(
        y.tolist(), bank_y.tolist(), False
    )


def test_index_repr():
    index = EmbeddingIndex(dim=4)
    assert repr(index) == (
        "EmbeddingIndex(0 items, dim=4, metric='cosine', kind='flat', backend='faiss')"
    )
    index.add(np.eye(4, dtype=np.float32), labels=np.arange(4), paths=list("abcd"))
    assert repr(index).startswith("EmbeddingIndex(4 items, dim=4") and "labels and paths" in repr(
        index
    )


def _vector_inference(tmp_path):
    model = build_model({"name": "mlp", "input_shape": [64], "embedding_dim": 8})
    config = {"model": model.config, "data": {"train": load_dataset("digits").summary()}}
    return Inference(model, config, tmp_path)


def test_vector_queries_out_of_the_training_range_get_a_scaling_hint(tmp_path):
    inf = _vector_inference(tmp_path)
    lo, hi = inf.config["data"]["train"]["value_range"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inf.embed_vectors(np.full((2, 64), (lo + hi) / 2, dtype=np.float32))  # no warning
    with pytest.warns(UserWarning, match="scale them as the training data was"):
        inf.embed_vectors(np.full((2, 64), 100 * (hi + 1), dtype=np.float32))


def test_index_paths_resolve_against_the_directory_index_ran_in(tmp_path, monkeypatch):
    make_image_folder(tmp_path / "work" / "imgs", n_classes=2, per_class=2, size=(8, 8))
    model = build_model({"name": "cnn", "input_shape": [1, 8, 8], "embedding_dim": 4})
    inf = Inference(model, {"model": model.config, "train": {"image_size": [8, 8]}}, tmp_path)
    monkeypatch.chdir(tmp_path / "work")
    ds = load_dataset("imgs", image_size=(8, 8), grayscale=True)
    assert not any(p.startswith("/") for p in ds.paths)  # relative, as on the command line
    inf.build_index(ds).save(tmp_path / "idx")
    monkeypatch.chdir(tmp_path)  # search from elsewhere
    index = EmbeddingIndex.load(tmp_path / "idx")
    paths = index.paths_of(index.ids)
    assert all(p.startswith(str(tmp_path / "work")) for p in paths)
    assert all(Path(p).exists() for p in paths)
