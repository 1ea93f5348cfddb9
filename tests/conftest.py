"""Shared fixtures: tiny synthetic image folders and the path to ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# ../shared/data beside the checkout; TRIPLETLAB_SHARED_DATA points elsewhere (e.g. a git worktree).
SHARED_DATA = Path(
    os.environ.get("TRIPLETLAB_SHARED_DATA")
    or (Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
).resolve()


def shared_data(name: str) -> Path:
    """Path of a real data set, or skip the test with a reason."""
    p = SHARED_DATA / name
    if not p.exists():
        pytest.skip(f"real data {name!r} not found at {p} (../shared/data is absent)")
    return p


def make_image_folder(
    root: Path,
    n_classes: int = 4,
    per_class: int = 6,
    size=(12, 10),
    rgb: bool = False,
    nested: bool = False,
    seed: int = 0,
) -> Path:
    """Class folders of small images whose brightness pattern depends on the class."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / (f"group{c % 2}/class{c}" if nested else f"class{c}")
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, size=size)
        for i in range(per_class):
            arr = np.clip(base + rng.normal(0, 12, size=size), 0, 255).astype(np.uint8)
            img = Image.fromarray(arr, mode="L")
            if rgb:
                img = img.convert("RGB")
            ext = [".png", ".pgm", ".bmp", ".jpg"][i % 4]
            img.save(d / f"img{i}{ext}")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "imgs")


_TINY_WORDS = (
    "a an the of or and to in is that by for with bond issued corporation iou united states "
    "treasury small domesticated feline wild forest young cat dog car bus kitten puppy word "
    "one two three four five red blue green animal vehicle money person place thing"
).split()


@pytest.fixture(scope="session")
def tiny_text_model(tmp_path_factory) -> Path:
    """A tiny randomly initialised BERT folder (config.json, model.safetensors, tokenizer with a
    word-level vocab.txt): a local transformers model that loads in well under a second."""
    transformers = pytest.importorskip("transformers", reason="text models need transformers")
    folder = tmp_path_factory.mktemp("tiny_bert")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_TINY_WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    wp = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=wp,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=32,
    )
    tok.save_pretrained(folder)
    import torch

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    transformers.BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests skip, with a reason, where torch sees no CUDA device (they run in
    ``benchmarks/gpu_check.sh`` on a GPU machine)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here): benchmarks/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
