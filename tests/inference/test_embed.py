"""The one ``embed(model, source, ...)``: tensors, texts, a Dataset and ImageFiles give the
embeddings the earlier per-source functions gave (model run in eval mode, in batches)."""

from __future__ import annotations

import pytest
import torch

from tripletlab.data import Dataset
from tripletlab.data.streaming import ImageFiles, class_ids, scan_images
from tripletlab.errors import InputError
from tripletlab.inference.embed import embed, run_input_spec
from tripletlab.models import build_model

from helpers import make_folder


def embed_in_memory(model, x, batch_size, device="cpu", amp=None):
    """The earlier in-memory embed, as it was: eval mode, no grad, batches, float32 on the CPU."""
    from tripletlab.runtime.devices import autocast

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad(), autocast(torch.device(device), amp):
        for s in range(0, len(x), batch_size):
            chunk = x[s : s + batch_size]
            out.append(model(chunk.to(device) if torch.is_tensor(chunk) else chunk).float().cpu())
    model.train(was_training)
    return torch.cat(out)


class _Texts(torch.nn.Module):
    """A toy text model: a few numbers per string."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)

    def forward(self, texts):
        feats = torch.tensor(
            [[len(t), t.count("a"), t.count(" ")] for t in texts], dtype=torch.float
        )
        return self.lin(feats)


def _cnn(channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        {"name": "cnn", "input_shape": [channels, 16, 16], "embedding_dim": 4, "channels": [4, 8]}
    )


def test_tensor_source_is_the_earlier_in_memory_embed():
    torch.manual_seed(1)
    m = build_model({"name": "mlp", "input_shape": [6], "embedding_dim": 3})
    x = torch.rand(23, 6)
    m.train()
    got = embed(m, x, batch_size=5)
    assert m.training  # mode restored
    assert torch.equal(got, embed_in_memory(m, x, 5))
    bf16 = embed(m, x, 5, "cpu", torch.bfloat16)
    assert torch.equal(bf16, embed_in_memory(m, x, 5, "cpu", torch.bfloat16))
    emb, kept = embed(m, x, batch_size=5, return_kept=True)
    assert torch.equal(emb, got) and kept == list(range(23))
    assert embed(m, x[:0]).shape == (0, 3)


def test_text_and_dataset_sources():
    m = _Texts()
    texts = ["a cat", "the dog", "a bank", "banana", "x"]
    assert torch.equal(embed(m, texts, batch_size=2), embed_in_memory(m, texts, 2))
    ds = Dataset(torch.zeros(5, 0), torch.arange(5), list("abcde"), None, "text", "t", texts=texts)
    assert torch.equal(embed(m, ds, batch_size=2), embed_in_memory(m, texts, 2))
    vec = Dataset(torch.rand(7, 6), torch.arange(7), list("abcdefg"), None, "vector", "v")
    mlp = build_model({"name": "mlp", "input_shape": [6], "embedding_dim": 3})
    assert torch.equal(embed(mlp, vec, batch_size=3), embed_in_memory(mlp, vec.x, 3))


def test_image_files_source_streams_like_in_memory(tmp_path):
    root = make_folder(tmp_path / "d")
    paths, labels = scan_images(root)
    files = ImageFiles(paths, class_ids(labels)[0], (16, 16), 1)
    x = torch.stack([files[i][0] for i in range(len(files))])
    m = _cnn()
    for workers in (0, 2):
        emb, kept = embed(m, files, batch_size=7, workers=workers, return_kept=True)
        assert kept == list(range(len(files)))
        assert torch.allclose(emb, embed_in_memory(m, x, 7), atol=1e-6)
    assert torch.allclose(embed(m, files, batch_size=7, workers=0), emb, atol=0)


def test_unknown_source_is_an_input_error():
    m = build_model({"name": "mlp", "input_shape": [2], "embedding_dim": 2})
    with pytest.raises(InputError, match="embed takes a tensor"):
        embed(m, "just one string")
    with pytest.raises(InputError, match="got dict"):
        embed(m, {"x": 1})


def test_run_input_spec():
    assert run_input_spec({"model": {"input_shape": [3, 32, 24]}}) == ((32, 24), 3)
    assert run_input_spec({"model": {"input_shape": [8]}}) == (None, None)
