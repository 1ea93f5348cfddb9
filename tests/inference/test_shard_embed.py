"""`tripletlab embed|index --distributed` under torchrun (2 gloo processes on 127.0.0.1): every
rank embeds its share, rank 0 merges in the original order; equal to one process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from tripletlab.cli import main
from tripletlab.index import EmbeddingIndex
from tripletlab.inference.shard import gather_to_main, shard_bounds

from helpers import free_port as _free_port
from helpers import make_folder
from helpers import subprocess_env as _env


def _torchrun(n: int, args: list[str]) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        "-m", "tripletlab", *args, "--distributed", "--dist-timeout", "60",
    ]  # fmt: skip


def _run(n: int, args: list[str]) -> None:
    proc = subprocess.run(_torchrun(n, args), env=_env(), capture_output=True, text=True,
                          timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shard_bounds_cover_every_item_once():
    for n in (0, 1, 7, 15):
        for w in (1, 2, 3):
            bounds = [shard_bounds(n, r, w) for r in range(w)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
            assert max(h - lo for lo, h in bounds) - min(h - lo for lo, h in bounds) <= 1
    assert torch.equal(gather_to_main(torch.arange(3)), torch.arange(3))  # one process


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    data = make_folder(root / "imgs", n_classes=3, per_class=5, size=(12, 12))  # 15: uneven
    run = root / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--steps", "2", "--p", "2",
            "--k", "2", "--image-size", "12", "12", "--no-eval", "--quiet", "--threads", "1",
            "--stream", "--workers", "0"]  # fmt: skip
    assert main(args) == 0
    return run, data


def test_sharded_embed_of_streamed_images_equals_one_process(image_run, tmp_path):
    run, data = image_run
    common = ["--model", str(run), "--data", str(data), "--workers", "0", "--batch-size", "4"]
    _run(2, ["embed", *common, "--out", str(tmp_path / "two.npz")])
    assert main(["embed", *common, "--out", str(tmp_path / "one.npz")]) == 0
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert one["embeddings"].shape == (15, two["embeddings"].shape[1])
    np.testing.assert_allclose(two["embeddings"], one["embeddings"], atol=1e-5, rtol=1e-4)
    for key in ("labels", "paths", "classes"):
        assert (two[key] == one[key]).all(), key
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, once


def test_sharded_index_of_in_memory_data_equals_one_process(tmp_path):
    run = tmp_path / "digits"
    assert main(["train", "--data", "digits", "--out", str(run), "--steps", "3", "--no-eval",
                 "--quiet", "--p", "5", "--k", "2"]) == 0  # fmt: skip
    common = ["--model", str(run), "--data", "digits"]
    _run(3, ["index", *common, "--out", str(tmp_path / "three")])  # 1797 rows: 599 each
    assert main(["index", *common, "--out", str(tmp_path / "one")]) == 0
    a = EmbeddingIndex.load(tmp_path / "one")
    b = EmbeddingIndex.load(tmp_path / "three")
    assert len(a) == len(b) == 1797
    assert np.array_equal(a.labels_of(np.arange(1797)), b.labels_of(np.arange(1797)))
    assert a.paths_of(np.arange(5)) == b.paths_of(np.arange(5))
    queries = np.random.default_rng(0).normal(size=(20, a.dim)).astype(np.float32)
    da, ia = a.search(queries, 5)
    db, ib = b.search(queries, 5)
    np.testing.assert_allclose(db, da, atol=1e-5)


def test_distributed_embed_without_torchrun_is_a_clear_error(image_run, tmp_path, capsys):
    run, data = image_run
    args = ["embed", "--model", str(run), "--data", str(data), "--out", str(tmp_path / "e.npz")]
    assert main([*args, "--distributed"]) == 1
    err = capsys.readouterr().err
    assert "torchrun --nproc_per_node N -m tripletlab embed --distributed" in err
    assert not (tmp_path / "e.npz").exists()
