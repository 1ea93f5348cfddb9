"""``CachedTripletLoss``: gradient caching inside sentence-transformers gives the uncached loss's
value and gradients (a tiny BERT built offline, with dropout, in float64)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")

from tripletlab.errors import InputError  # noqa: E402
from tripletlab.integrations.sentence_transformers import (  # noqa: E402
    CachedTripletLoss,
    TripletLoss,
)

HAS_TRAIN = all(importlib.util.find_spec(m) for m in ("datasets", "accelerate"))
WORDS = [f"w{i}" for i in range(40)]


def _modules():
    try:  # 6.x
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.models import Pooling, Transformer
    return Transformer, Pooling


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A 1-layer, 16-wide BERT with a 45-word vocabulary, saved locally (nothing downloaded)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    BertTokenizerFast(vocab_file=str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.2,
        attention_probs_dropout_prob=0.2,
    )
    BertModel(cfg).save_pretrained(str(d))
    return d


def _model(folder, dtype=torch.float64):
    Transformer, Pooling = _modules()
    model = st.SentenceTransformer(modules=[Transformer(str(folder)), Pooling(16)], device="cpu")
    return model.to(dtype).train()


def _texts(n=18, seed=0):
    g = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        length = 2 + int(torch.randint(0, 6, (1,), generator=g))
        ids = torch.randint(0, len(WORDS), (length,), generator=g)
        texts.append(" ".join(WORDS[int(j)] for j in ids))
    return texts, torch.arange(n // 3).repeat_interleave(3)


def _rows(feats, start, stop):
    return {k: v[start:stop] if torch.is_tensor(v) else v for k, v in feats.items()}


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(a, b, tol):
    assert a.keys() == b.keys() and a
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=k)


@pytest.mark.parametrize("strategy", ["semihard", "hard", "all"])
def test_cached_gradients_equal_the_uncached_loss(tiny_folder, strategy):
    texts, labels = _texts()
    ref_model, model = _model(tiny_folder), _model(tiny_folder)
    feats = ref_model.tokenize(texts)
    # reference: the same mini-batches (same dropout draws) in one graph, the uncached loss
    torch.manual_seed(5)
    emb = torch.cat([ref_model(_rows(feats, s, s + 4))["sentence_embedding"]
                     for s in range(0, len(texts), 4)])  # fmt: skip
    ref_loss = TripletLoss(ref_model, strategy=strategy).compute_loss_from_embeddings([emb], labels)
    ref_loss.backward()
    torch.manual_seed(5)
    loss_fn = CachedTripletLoss(model, strategy=strategy, mini_batch_size=4)
    loss = loss_fn([model.tokenize(texts)], labels)
    assert loss.requires_grad and abs(float(loss.detach() - ref_loss.detach())) < 1e-12
    loss.backward()
    _assert_same(_grads(model), _grads(ref_model), 1e-10)
    assert loss_fn.stats["n_triplets"] > 0


def test_without_dropout_equals_one_uncached_forward(tiny_folder):
    texts, labels = _texts(seed=1)
    ref_model, model = _model(tiny_folder).eval(), _model(tiny_folder).eval()
    ref_loss = TripletLoss(ref_model, strategy="semihard")([ref_model.tokenize(texts)], labels)
    ref_loss.backward()
    loss = CachedTripletLoss(model, mini_batch_size=5)([model.tokenize(texts)], labels)
    (loss * 0.5).backward()  # the incoming gradient (gradient accumulation) scales every chunk
    torch.testing.assert_close(loss.detach(), ref_loss.detach(), atol=1e-12, rtol=0)
    _assert_same({k: 2 * g for k, g in _grads(model).items()}, _grads(ref_model), 1e-10)


def test_no_grad_evaluation_and_bad_input(tiny_folder):
    texts, labels = _texts()
    model = _model(tiny_folder).eval()
    loss_fn = CachedTripletLoss(model, mini_batch_size=7)
    with torch.no_grad():
        loss = loss_fn([model.tokenize(texts)], labels)
    assert not loss.requires_grad and loss > 0
    with pytest.raises(InputError, match="chunk_size must be an integer >= 1"):
        CachedTripletLoss(model, mini_batch_size=0)
    with pytest.raises(InputError, match="one text column"):
        loss_fn([model.tokenize(texts), model.tokenize(texts)], labels)
    assert loss_fn.get_config_dict()["mini_batch_size"] == 7
    assert "gao2021scaling" in loss_fn.citation


@pytest.mark.skipif(not HAS_TRAIN, reason="SentenceTransformerTrainer needs datasets + accelerate")
def test_one_line_swap_in_their_trainer(tiny_folder, tmp_path):
    """Two steps of SentenceTransformerTrainer: the cached loss logs the uncached loss's values
    and leaves the same weights (dropout off, float32, SGD)."""
    from datasets import Dataset

    try:
        from sentence_transformers.base.sampler import BatchSamplers  # 6.x
    except ImportError:  # 3.x - 5.x
        from sentence_transformers.training_args import BatchSamplers

    texts, labels = _texts(24, seed=2)
    ds = Dataset.from_dict({"sentence": texts, "label": labels.tolist()})

    def run(cached):
        model = _model(tiny_folder, torch.float32)
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        loss = (
            CachedTripletLoss(model, strategy="hard", mini_batch_size=5)
            if cached
            else TripletLoss(model, strategy="hard")
        )
        args = st.SentenceTransformerTrainingArguments(
            output_dir=str(tmp_path / str(cached)),
            per_device_train_batch_size=12,
            max_steps=2,
            learning_rate=0.1,
            optim="sgd",  # (Adam's normalisation would magnify rounding on ~0 gradients)
            logging_steps=1,
            batch_sampler=BatchSamplers.GROUP_BY_LABEL,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)
        trainer.train()
        logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return logged, {k: v.detach().clone() for k, v in model.state_dict().items()}

    (la, wa), (lb, wb) = run(False), run(True)
    assert len(la) == 2 and la == pytest.approx(lb, abs=1e-5)
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0, msg=k)
