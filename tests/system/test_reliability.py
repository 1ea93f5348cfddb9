"""Reliability and security: killed runs, untrusted files, bad data, numerical faults, fuzzing.

Real processes where it matters: training runs are started with `python -m tripletlab`, killed
with SIGKILL and resumed through the CLI.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tripletlab import TripletLabError
from tripletlab.cli import main
from tripletlab.data import load_dataset
from tripletlab.index import EmbeddingIndex
from tripletlab.train import load_checkpoint, save_checkpoint

TRAIN = [
    "train",
    "--data",
    "digits",
    "--steps",
    "240",
    "--checkpoint-every",
    "8",
    "--eval-every",
    "40",
    "--log-every",
    "8",
    "--embedding-dim",
    "16",
    "--p",
    "5",
    "--quiet",
    "--no-report",
]


def _cli(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tripletlab", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        **kw,
    )


def _model_weights(run: Path) -> dict:
    return load_file(str(run / "model.safetensors"))


# ----------------------------------------------------------------------------- kill/resume


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("rel") / "ref"
    p = _cli([*TRAIN, "--out", str(run)])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()
    return run


@pytest.mark.parametrize("kill_after_checkpoints", [1, 4, 9])
def test_sigkill_then_resume_matches_uninterrupted_run(
    reference_run, tmp_path, kill_after_checkpoints
):
    run = tmp_path / "killed"
    p = _cli([*TRAIN, "--out", str(run)])
    manifest = run / "checkpoint" / "manifest.json"
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            step = json.loads(manifest.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = -1
        if step >= 8 * kill_after_checkpoints:
            break
        time.sleep(0.005)
    if p.poll() is not None:
        pytest.skip("the run finished before it could be killed (machine too fast)")
    p.send_signal(signal.SIGKILL)
    p.wait()
    _, _, state = load_checkpoint(run)  # a complete, verified checkpoint survived
    assert state["step"] < 240
    r = _cli(["train", "--resume", str(run), "--quiet", "--no-report"])
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err.decode()
    a, b = _model_weights(reference_run), _model_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = json.loads((reference_run / "eval.json").read_text())
    eb = json.loads((run / "eval.json").read_text())
    assert ea["retrieval"] == eb["retrieval"] and ea["threshold"] == eb["threshold"]


def test_crash_inside_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    run = tmp_path / "r"
    run.mkdir()
    save_checkpoint(run, {"w": torch.ones(3)}, {"state": {}, "param_groups": []}, {"step": 1})
    real = os.replace
    calls = {"n": 0}

    def crash_on(n):
        def fake(a, b):
            calls["n"] += 1
            if calls["n"] == n:
                raise KeyboardInterrupt("simulated kill")
            return real(a, b)

        return fake

    for n in (1, 2):  # before moving the old one away; between the two renames
        calls["n"] = 0
        monkeypatch.setattr(os, "replace", crash_on(n))
        with pytest.raises(KeyboardInterrupt):
            save_checkpoint(
                run, {"w": torch.zeros(3)}, {"state": {}, "param_groups": []}, {"step": 2}
            )
        monkeypatch.setattr(os, "replace", real)
        tensors, _, state = load_checkpoint(run)
        assert state["step"] == 1 and torch.equal(tensors["w"], torch.ones(3))
        if (run / ".checkpoint.old").exists() and not (run / "checkpoint").exists():
            real(run / ".checkpoint.old", run / "checkpoint")


# -------------------------------------------------------------------------- untrusted files


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/tripletlab-pwned",))


@pytest.fixture
def trained(tmp_path):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--out",
                str(run),
                "--steps",
                "8",
                "--p",
                "5",
                "--embedding-dim",
                "8",
                "--quiet",
                "--no-report",
                "--eval-every",
                "4",
            ]
        )
        == 0
    )
    return run


def _fix_manifest(run: Path, name: str) -> None:
    from tripletlab.utils import sha256_file

    man_path = run / "checkpoint" / "manifest.json"
    man = json.loads(man_path.read_text())
    man["files"][name] = sha256_file(run / "checkpoint" / name)
    man_path.write_text(json.dumps(man))


def test_crafted_pickle_is_not_executed(trained, capsys):
    Path("/tmp/tripletlab-pwned").unlink(missing_ok=True)
    (trained / "checkpoint" / "optimizer.pt").write_bytes(pickle.dumps(_Evil()))
    _fix_manifest(trained, "optimizer.pt")  # the attacker controls the manifest too
    assert main(["train", "--resume", str(trained), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint" in err and "Traceback" not in err
    assert not Path("/tmp/tripletlab-pwned").exists()


def test_checksum_mismatch_truncated_weights_and_bad_configs(trained, capsys):
    ckpt = trained / "checkpoint" / "state.safetensors"
    ckpt.write_bytes(ckpt.read_bytes() + b"x")
    assert main(["train", "--resume", str(trained), "--quiet"]) == 1
    assert "state.safetensors" in capsys.readouterr().err
    w = trained / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[: len(good) // 2])
    assert main(["eval", "--model", str(trained)]) == 1
    assert "model.safetensors" in capsys.readouterr().err
    w.write_bytes(good)
    cfg_path = trained / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for bad_model in (
        {"name": "subprocess.Popen", "input_shape": [64]},
        {"name": "mlp", "input_shape": "64"},
        {"name": "mlp", "input_shape": [64], "embedding_dim": "8"},
        {"name": "mlp", "input_shape": [64], "__class__": "x"},
    ):
        cfg_path.write_text(json.dumps({**cfg, "model": bad_model}))
        assert main(["eval", "--model", str(trained)]) == 1
        err = capsys.readouterr().err
        assert "config.json" in err and "Traceback" not in err
    cfg_path.write_text("{ not json")
    assert (
        main(
            ["embed", "--model", str(trained), "--data", "digits", "--out", str(trained / "e.npz")]
        )
        == 1
    )
    assert "config.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------ index / CLI


def test_index_and_output_path_errors(trained, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["index", "--model", str(trained), "--data", "digits", "--out", str(idx)]) == 0
    empty = EmbeddingIndex(8)
    empty.save(tmp_path / "empty")
    q = tmp_path / "q.npy"
    np.save(q, np.zeros((1, 64), dtype=np.float32))
    capsys.readouterr()
    assert (
        main(["search", str(q), "--model", str(trained), "--index", str(tmp_path / "empty")]) == 1
    )
    assert "empty" in capsys.readouterr().err
    assert (
        main(
            [
                "search",
                str(q),
                "--model",
                str(trained),
                "--index",
                str(idx),
                "-k",
                "100000",
                "--json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)[0]["neighbours"]) == 1797
    assert (
        main(
            [
                "embed",
                "--model",
                str(trained),
                "--data",
                "digits",
                "--out",
                "/proc/no/such/dir/e.npz",
            ]
        )
        == 1
    )
    assert "error:" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        assert (
            main(["embed", "--model", str(trained), "--data", "digits", "--out", str(ro / "e.npz")])
            == 1
        )
    finally:
        ro.chmod(0o700)


# ----------------------------------------------------------------------------------- fuzz

_EXTS = [".npz", ".npy", ".csv", ".png", ".pgm", ".jpg"]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    payload=st.binary(max_size=300),
    ext=st.sampled_from(_EXTS),
    prefix=st.sampled_from(
        [
            b"",
            b"\x89PNG\r\n\x1a\n",
            b"PK\x03\x04",
            b"\x93NUMPY",
            b"P5\n4 4\n255\n",
            b"a,b,label\n",
            b"\x1f\x8b",
        ]
    ),
)
@example(payload=b"\r\x00", ext=".csv", prefix=b"")  # csv.Error escaped the text-file sniffer
@example(payload=b"\r\x00", ext=".csv", prefix=b"a,b,label\n")
def test_fuzz_file_loaders_raise_only_documented_errors(tmp_path, payload, ext, prefix):
    data = prefix + payload
    if ext in (".npz", ".npy", ".csv"):
        f = tmp_path / f"v{ext}"
        f.write_bytes(data)
        target = f
    else:
        d = tmp_path / "imgs"
        for c in ("a", "b"):
            (d / c).mkdir(parents=True, exist_ok=True)
        (d / "a" / f"x{ext}").write_bytes(data)
        (d / "b" / f"y{ext}").write_bytes(data)
        target = d
    try:
        ds = load_dataset(str(target))
    except TripletLabError:
        return
    assert len(ds) > 0 and torch.isfinite(ds.x).all()


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(max_size=200))
def test_fuzz_idx_files(tmp_path_factory, payload):
    d = tmp_path_factory.mktemp("idx")
    (d / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + payload)
    (d / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01" + payload[:8])
    with pytest.raises(TripletLabError):
        load_dataset(str(d))


_WORDS = [
    "train",
    "eval",
    "embed",
    "index",
    "search",
    "verify",
    "report",
    "--data",
    "--model",
    "--out",
    "--steps",
    "-k",
    "--p",
    "--margin",
    "--strategy",
    "--image-size",
    "digits",
    "nan",
    "-1",
    "0",
    "3",
    "1e9",
    "x",
    "--json",
    "--resume",
    "/nonexistent",
    "--threshold",
    "--config",
    "--test-classes",
    "--kind",
    "hnsw",
    "semihard",
    "",
    "--debug",
    "--device",
    "ten",
    "--pairs",
    "one.png",
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(argv=st.lists(st.sampled_from(_WORDS), max_size=6))
def test_fuzz_cli_arguments(argv, capsys):
    if argv[:1] == ["train"] and "--out" not in argv:
        argv = [*argv, "--out", "/nonexistent/dir"]  # never start a real default run
    argv = [a for a in argv if a != "--resume"] if "train" in argv[:1] else argv
    if "--debug" in argv:  # --debug asks for errors to propagate, traceback and all
        try:
            code = main(argv)
        except Exception:  # noqa: BLE001 - what --debug is for
            return
    else:
        code = main(argv)
    err = capsys.readouterr().err
    assert code in (0, 1, 2)
    assert "Traceback" not in err


# ------------------------------------------------------------------ issue #25 (files)


def test_atomic_writers_refuse_what_is_not_a_regular_file(tmp_path):
    """`--out /dev/full`: every atomic writer (tripletlab.utils, used by rundir.files) refuses
    a device, a FIFO or a directory instead of renaming a regular file over it."""
    from tripletlab import InputError
    from tripletlab.rundir.files import save_weights
    from tripletlab.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "dir").mkdir()
    for target in ("/dev/full", "/dev/null", fifo, tmp_path / "dir"):
        for write in (
            lambda p: atomic_write_bytes(p, b"x"),
            lambda p: atomic_write_text(p, "x"),
            lambda p: atomic_write_json(p, {}),
            lambda p: save_weights(p, {"w": torch.zeros(1)}),
        ):
            with pytest.raises(InputError, match="not a regular file"):
                write(target)
    assert Path("/dev/full").is_char_device() and fifo.is_fifo()
    atomic_write_bytes(tmp_path / "ok.bin", b"x")  # a regular file (new or old) is fine
    atomic_write_bytes(tmp_path / "ok.bin", b"y")
    assert (tmp_path / "ok.bin").read_bytes() == b"y"


def test_a_killed_checkpoint_write_leaves_no_directory_behind(tmp_path, monkeypatch):
    from tripletlab.rundir import files

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".checkpoint.tmp-{dead.pid}").mkdir()  # a write SIGKILLed halfway
    (run / ".checkpoint.tmp-notapid").mkdir()  # not ours: left alone

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "save_weights", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.save_checkpoint(run, {"w": torch.zeros(1)}, {}, {"step": 1})
    assert sorted(p.name for p in run.iterdir()) == [".checkpoint.tmp-notapid"]


def test_hostile_run_and_config_files_are_clear_errors(tmp_path):
    """config.json holding 10^400, `"train": "oops"` or a FIFO; a --config FIFO."""
    from tripletlab import FileFormatError
    from tripletlab.rundir.files import read_json
    from tripletlab.train.config import load_config_file

    p = tmp_path / "config.json"
    for text, match in (
        ('{"model": {"embedding_dim": 1' + "0" * 400 + "}}", "401 digits"),
        ('{"train": "oops", "model": {}}', "'train' must be a JSON object"),
        ('{"model": ' * 5000 + "1" + "}" * 5000, "cannot read"),
    ):
        p.write_text(text)
        with pytest.raises(FileFormatError, match=match):
            read_json(p, "run config")
    p.unlink()
    os.mkfifo(p)
    with pytest.raises(FileFormatError, match="not a regular file"):
        read_json(p, "run config")  # would block forever in read_text
    with pytest.raises(FileFormatError, match="not a regular file"):
        load_config_file(p)
