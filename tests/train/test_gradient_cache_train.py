"""``--chunk-size``: the trainer's gradient caching trains like the plain path, resumes exactly,
is ignored (with a note) on the frozen-feature cache, and a bad value exits 2."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tripletlab.cli import main
from tripletlab.errors import UsageError
from tripletlab.train import Trainer
from tripletlab.train.config import resolve_config

from conftest import make_image_folder


def _cfg(tmp_path, name, **kw):
    base = {
        "data": "digits",
        "out": str(tmp_path / name),
        "steps": 8,
        "eval_every": 4,
        "checkpoint_every": 4,
        "log_every": 2,
        "quiet": True,
        "report": False,
        "evaluate": False,
        "embedding_dim": 16,
        "model_options": {"hidden": [32], "batchnorm": False},
        "p": 5,
        "k": 4,
        "threads": 1,
    }
    base.update(kw)
    return resolve_config(overrides=base)


def _weights(run):
    w = load_file(str(run / "checkpoint" / "state.safetensors"))
    return {k: v for k, v in w.items() if k.startswith("model.")}


def _losses(run):
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r.get("type") != "eval"]


def test_chunked_training_equals_the_plain_path(tmp_path):
    lines = []
    Trainer(_cfg(tmp_path, "plain")).fit()
    Trainer(_cfg(tmp_path, "chunked", chunk_size=6), log=lines.append).fit()
    assert any("embedded 6 at a time" in x for x in lines)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "chunked")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    la, lb = _losses(tmp_path / "plain"), _losses(tmp_path / "chunked")
    assert len(la) == 4 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb, strict=True))


def test_chunked_training_resumes_bit_identical(tmp_path):
    Trainer(_cfg(tmp_path, "full", chunk_size=7, memory_size=40)).fit()
    half = Trainer(_cfg(tmp_path, "half", chunk_size=7, memory_size=40))
    half.total_steps = 4  # as if killed after the checkpoint at step 4
    half.fit()
    resumed = Trainer(_cfg(tmp_path, "half", chunk_size=7, memory_size=40), resume=True)
    assert resumed.state.step == 4
    resumed.fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "half")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chunk_size_at_least_the_batch_is_the_plain_path(tmp_path):
    lines = []
    Trainer(_cfg(tmp_path, "plain", steps=4)).fit()
    Trainer(_cfg(tmp_path, "big", steps=4, chunk_size=20), log=lines.append).fit()
    assert any("no caching" in x for x in lines)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "big")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("value", ["0", "-4"])
def test_bad_chunk_size_exits_2(tmp_path, value, capsys):
    with pytest.raises(UsageError, match="chunk-size must be an integer >= 1"):
        resolve_config(overrides={"chunk_size": int(value)})
    code = main(["train", "--chunk-size", value, "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    assert "--chunk-size must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_chunk_size_trains_like_without(tmp_path):
    common = ["train", "--steps", "6", "--log-every", "2", "--eval-every", "6", "--quiet"]
    common += ["--no-report", "--p", "5", "--k", "4", "--threads", "1"]
    conf = tmp_path / "mlp.json"  # no BatchNorm: chunks then see what the batch sees
    conf.write_text(
        json.dumps({"model_options": {"hidden": [32], "batchnorm": False}, "evaluate": False})
    )
    common += ["--config", str(conf)]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--out", str(tmp_path / "b"), "--chunk-size", "8"]) == 0
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert len(la) == 3 and all(abs(x - y) < 1e-5 for x, y in zip(la, lb, strict=True))
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert json.dumps(cfg).count('"chunk_size": 8') == 1


@pytest.mark.parametrize("value", [2, "auto"])
def test_frozen_feature_cache_ignores_chunk_size_with_a_note(tmp_path, value):
    folder = make_image_folder(tmp_path / "imgs", n_classes=6, per_class=5, size=(16, 12))
    cfg = resolve_config(
        overrides={
            "data": str(folder),
            "out": str(tmp_path / "frozen"),
            "steps": 2,
            "eval_every": 2,
            "quiet": True,
            "report": False,
            "evaluate": False,
            "backbone": "mobilenet_v2",
            "image_size": [32, 32],
            "freeze_stages": "all",
            "feature_blocks": [3],
            "embedding_dim": 8,
            "p": 3,
            "k": 2,
            "threads": 1,
            "device": "cpu",
            "chunk_size": value,
        }
    )
    lines = []
    trainer = Trainer(cfg, log=lines.append)
    trainer.fit()
    assert trainer.features is not None
    assert any(f"--chunk-size {value} ignored" in x and "frozen-feature cache" in x for x in lines)
    assert not any(x.startswith("auto: chunk size") for x in lines)  # no probe


def test_batchnorm_model_warns_once_in_one_line(tmp_path):
    cfg = _cfg(tmp_path, "bn", steps=3, chunk_size=6, model_options={"hidden": [32]})
    with pytest.warns(UserWarning, match="BatchNorm in training mode.*batchnorm=false") as rec:
        Trainer(cfg).fit()
    msgs = {str(w.message) for w in rec if "BatchNorm" in str(w.message)}
    assert len(msgs) == 1 and "\n" not in msgs.pop()


def test_text_encoder_and_triplet_file_train_with_chunks(
    tmp_path, tiny_text_model, capsys, monkeypatch
):
    """Texts (a list of strings per batch) go through the cached path too."""
    pytest.importorskip("transformers", reason="text models need transformers (extra [text])")
    data = tmp_path / "texts.csv"
    groups = {
        "cat": ["a small cat", "a young cat", "a wild cat", "a cat of the forest"],
        "dog": ["a young dog", "a small dog", "a wild dog", "a dog of the forest"],
        "car": ["a small car", "a red car", "a car or bus", "a blue car"],
        "bus": ["a red bus", "a blue bus", "a bus or car", "a small bus"],
    }
    data.write_text("text,label\n" + "".join(f"{t},{c}\n" for c, ts in groups.items() for t in ts))
    fast = ["--steps", "2", "--p", "3", "--k", "2", "--threads", "1", "--quiet", "--no-report"]
    code = main(
        ["train", "--data", str(data), "--model", str(tiny_text_model), "--val-fraction", "0",
         "--test-classes", "bus", "--out", str(tmp_path / "t"), "--chunk-size", "4", *fast]
    )  # fmt: skip
    assert code == 0
    assert "embedded 4 at a time" in capsys.readouterr().err
    assert all(x == x for x in _losses(tmp_path / "t"))  # finite (not NaN)
    rows = [{"anchor": "a small cat", "positive": "a young cat", "negative": "a red bus"}] * 8
    trip = tmp_path / "triplets.jsonl"
    trip.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(
        ["train", "--data", str(trip), "--model", str(tiny_text_model), "--eval-every", "2",
         "--out", str(tmp_path / "trip"), "--chunk-size", "4", *fast]
    )  # fmt: skip
    assert code == 0
    capsys.readouterr()
    _fake_free(monkeypatch, 2000)  # a list of texts per batch: the probe slices it too
    code = main(
        ["train", "--data", str(trip), "--model", str(tiny_text_model), "--eval-every", "2",
         "--out", str(tmp_path / "trip-auto"), "--chunk-size", "auto", *fast]
    )  # fmt: skip
    assert code == 0
    assert "auto: chunk size " in capsys.readouterr().err


def test_two_gloo_processes_with_chunks_train_like_one_plain_process(tmp_path):
    """torchrun, 2 processes of 10 items each in chunks of 3 (DDP no_sync on all but the last
    chunk, the distributed loss) == 1 process on the 20-item batch without chunks."""
    import subprocess
    import sys

    from helpers import free_port, subprocess_env

    recipe = tmp_path / "model.json"  # a linear model: no BatchNorm, no dropout
    recipe.write_text(json.dumps({"model_options": {"hidden": []}}))
    args = ["--data", "digits", "--steps", "10", "--no-eval", "--seed", "3", "--quiet"]
    args += ["--embedding-dim", "16", "--p", "5", "--k", "4", "--no-report"]
    args += ["--config", str(recipe), "--threads", "1"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    torchrun += ["-m", "tripletlab", "train", "--distributed", "--chunk-size"]
    proc = subprocess.run(
        [*torchrun, "3", *args, "--out", str(tmp_path / "two")],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this rank's 10 of the P*K = 20" in proc.stderr
    auto = subprocess.run(  # each rank probes its 10 items, the ranks agree (all-reduce min)
        [*torchrun, "auto", *args, "--out", str(tmp_path / "two-auto")],
        env=subprocess_env(), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert auto.returncode == 0, auto.stderr[-3000:]
    assert auto.stderr.count("auto: chunk size off (the batch of 10 needs") == 1  # rank 0
    assert main(["train", *args, "--out", str(tmp_path / "one")]) == 0
    two, one = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert two.keys() == one.keys()
    for k in one:
        assert torch.allclose(two[k], one[k], atol=1e-5), k


def _fake_free(monkeypatch, free: int) -> None:
    """The free memory ``--chunk-size auto`` sees (the probe itself is real)."""
    import tripletlab.losses.chunk_choice as chunk_choice

    monkeypatch.setattr(chunk_choice, "free_memory", lambda device="cpu": (free, "test"))


def _chosen(run):
    return json.loads((run / "config.json").read_text())["train"]["chunk_size"]


def test_auto_chunk_size_chunks_when_memory_is_short_and_resumes_with_it(tmp_path, monkeypatch):
    _fake_free(monkeypatch, 24000)  # the 20-item batch of this MLP needs ~15 KiB
    lines = []
    Trainer(_cfg(tmp_path, "auto", chunk_size="auto", memory_size=40), log=lines.append).fit()
    chosen = _chosen(tmp_path / "auto")  # recorded in config.json in place of "auto"
    assert isinstance(chosen, int) and 1 <= chosen < 20
    line = next(x for x in lines if x.startswith("auto: chunk size"))
    assert line.startswith(f"auto: chunk size {chosen} (the batch of 20 would need ~")
    assert "may not fit" not in line
    assert "per item, tensor peak; 23.4 KiB free (test), 0.5 of it allowed)" in line
    assert any(f"embedded {chosen} at a time" in x for x in lines)
    # the probe leaves no trace: the same run as that chunk size given
    Trainer(_cfg(tmp_path, "fixed", chunk_size=chosen, memory_size=40)).fit()
    a, b = _weights(tmp_path / "auto"), _weights(tmp_path / "fixed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # killed after step 4, resumed where memory is plenty: the recorded chunk size is used
    half = Trainer(_cfg(tmp_path, "half", chunk_size="auto", memory_size=40))
    half.total_steps = 4
    half.fit()
    _fake_free(monkeypatch, 1 << 40)
    saved = json.loads((tmp_path / "half" / "config.json").read_text())["train"]
    assert saved["chunk_size"] == chosen
    later = []
    resumed = Trainer(resolve_config(saved, {}), resume=True, log=later.append)
    assert resumed.state.step == 4
    resumed.fit()
    assert not any(x.startswith("auto: chunk size") for x in later)
    assert any(f"embedded {chosen} at a time" in x for x in later)
    c = _weights(tmp_path / "half")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_auto_chunk_size_off_when_the_batch_fits_is_the_plain_run(tmp_path, monkeypatch):
    _fake_free(monkeypatch, 1 << 30)
    lines = []
    Trainer(_cfg(tmp_path, "plain", steps=4)).fit()
    t = Trainer(_cfg(tmp_path, "auto", steps=4, chunk_size="auto"), log=lines.append)
    result = t.fit()
    line = next(x for x in lines if x.startswith("auto: chunk size"))
    assert line.startswith("auto: chunk size off (the batch of 20 needs ~")
    assert "1.00 GiB free (test)" in line
    assert _chosen(tmp_path / "auto") is None
    assert any(x.startswith("chunk size off") for x in result["auto"])  # eval.json's auto list
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "auto")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_auto_chunk_size_prints_the_choice_and_resumes(tmp_path, monkeypatch, capsys):
    conf = tmp_path / "mlp.json"
    conf.write_text(json.dumps({"model_options": {"hidden": [32], "batchnorm": False}}))
    run = str(tmp_path / "r")
    args = ["train", "--config", str(conf), "--steps", "4", "--p", "5", "--k", "4", "--quiet"]
    args += ["--no-report", "--no-eval", "--threads", "1", "--log-every", "2", "--out", run]
    _fake_free(monkeypatch, 24000)
    assert main([*args, "--chunk-size", "auto"]) == 0
    err = capsys.readouterr().err
    chosen = _chosen(tmp_path / "r")
    assert isinstance(chosen, int) and f"auto: chunk size {chosen} (the batch of 20" in err
    _fake_free(monkeypatch, 1 << 40)
    assert main(["train", "--resume", run, "--steps", "6", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "auto: chunk size" not in err and f"embedded {chosen} at a time" in err
    assert len(_losses(tmp_path / "r")) == 3


@pytest.mark.parametrize("value", ["autox", "0", "-1", "2.5", "AUTO"])
def test_bad_chunk_size_words_exit_2(tmp_path, value, capsys):
    code = main(["train", "--chunk-size", value, "--out", str(tmp_path / "r"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--chunk-size must be an integer >= 1 or auto, got" in err and value in err
    assert not (tmp_path / "r").exists()


def test_bad_chunk_size_in_a_config_file_exits_2(tmp_path, capsys):
    conf = tmp_path / "c.json"
    conf.write_text(json.dumps({"chunk_size": "autox"}))
    assert main(["train", "--config", str(conf), "--out", str(tmp_path / "r")]) == 2
    assert "--chunk-size must be an integer >= 1 or auto, got 'autox'" in capsys.readouterr().err
    assert resolve_config({"chunk_size": "auto"}).chunk_size == "auto"


def test_auto_probe_during_a_head_only_warm_up_leaves_the_backbone_frozen(tmp_path, monkeypatch):
    """The probe measures the backbone as trainable (what the fine-tuning steps hold), then the
    warm-up step freezes it again: the run equals the plain one."""
    folder = make_image_folder(tmp_path / "imgs", n_classes=6, per_class=5, size=(16, 12))
    _fake_free(monkeypatch, 1 << 40)

    def run(name, chunk):
        cfg = resolve_config(
            overrides={
                "data": str(folder), "out": str(tmp_path / name), "steps": 3, "quiet": True,
                "report": False, "evaluate": False, "backbone": "mobilenet_v2",
                "image_size": [64, 64], "embedding_dim": 8, "p": 3, "k": 2, "threads": 1,
                "device": "cpu", "head_warmup_steps": 2, "chunk_size": chunk, "guard": False,
                "interpolate": "none", "augment": "none", "strategy": "all",
                "head_init": "random",
            }
        )  # fmt: skip
        lines = []
        Trainer(cfg, log=lines.append).fit()
        return lines

    run("plain", None)
    lines = run("auto", "auto")
    assert any(x.startswith("auto: chunk size off") for x in lines)
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "auto")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the backbone untouched for 2 steps
