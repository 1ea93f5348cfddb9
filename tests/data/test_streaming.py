"""Streamed image data: folders and manifests, seeded per-sample augmentation, PK batches through
DataLoader workers (deterministic, resumable), bad files, dead workers, batched embedding."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from tripletlab.data import load_dataset
from tripletlab.data.streaming import (
    DataWorkerError,
    ImageFiles,
    PKStream,
    SampleAugment,
    class_ids,
    probe_images,
    read_image_manifest,
    scan_images,
)
from tripletlab.errors import FileFormatError, InputError, MissingFileError
from tripletlab.inference.embed import embed
from tripletlab.samplers import PKSampler

from helpers import make_folder


def embed_files(model, files, **kw):
    """Streamed embedding of ImageFiles: the one ``embed`` (was ``streaming.embed_files``)."""
    return embed(model, files, return_kept=True, **kw)


def files_of(root, size=(16, 16), channels=1, augment=None):
    paths, labels = scan_images(root)
    ids, _ = class_ids(labels)
    return ImageFiles(paths, ids, size, channels, augment)


def test_decoding_matches_the_in_memory_loader(tmp_path):
    root = make_folder(tmp_path / "d")
    ds = load_dataset(str(root), image_size=(16, 12), grayscale=True)
    f = files_of(root, (16, 12))
    assert f.input_shape == (1, 16, 12)
    x = torch.stack([f[i][0] for i in range(len(f))])
    assert torch.equal(x, ds.x)
    assert f.labels.tolist() == ds.y.tolist()
    assert probe_images(f.paths) == ((20, 24), 1)


def test_manifests_csv_and_jsonl(tmp_path):
    root = make_folder(tmp_path / "d", n_classes=2, per_class=2)
    rows = [("d/c0/0.png", "a"), ("d/c0/1.png", "a"), ("d/c1/0.png", "b")]
    (tmp_path / "m.csv").write_text("label,path\n" + "".join(f"{b},{a}\n" for a, b in rows))
    with open(tmp_path / "m.jsonl", "w") as fh:
        for a, b in rows:
            fh.write(json.dumps({"path": a, "label": b}) + "\n")
    for name in ("m.csv", "m.jsonl"):
        paths, labels = read_image_manifest(tmp_path / name)
        assert labels == ["a", "a", "b"]
        assert paths[2] == str(tmp_path / "d/c1/0.png")
    assert scan_images(tmp_path / "m.csv") == read_image_manifest(tmp_path / "m.csv")
    assert root.exists()


@pytest.mark.parametrize(
    ("text", "err", "match"),
    [
        ("path\nd/c0/0.png\n", FileFormatError, "no 'label' column"),
        ("path,label\nd/c0/0.png,a\nd/nope.png,b\n", MissingFileError, "1 files that do not"),
        ("path,label\n", FileFormatError, "lists no images"),
        ("path,label\n,a\n", FileFormatError, "empty path or label"),
    ],
)
def test_bad_manifests(tmp_path, text, err, match):
    make_folder(tmp_path / "d", n_classes=1, per_class=1)
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(err, match=match):
        read_image_manifest(tmp_path / "m.csv")


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "x.png"}\n')
    with pytest.raises(FileFormatError, match="line 1"):
        read_image_manifest(tmp_path / "m.jsonl")


def test_sample_augment_is_seeded_and_bounded():
    aug = SampleAugment(degrees=15, jitter=0.3)
    x = torch.rand(3, 24, 20)
    a, b, c = aug(x, 7), aug(x, 7), aug(x, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    ident = SampleAugment(crop_scale=(1.0, 1.0), crop_ratio=(1, 1), hflip=False, degrees=0)
    assert torch.allclose(ident(x, 3), x, atol=1e-5)
    assert SampleAugment.from_config("none") is None
    with pytest.raises(InputError, match="unknown augmentation keys"):
        SampleAugment.from_config({"sharpen": 1})
    with pytest.raises(InputError, match="crop_scale"):
        SampleAugment(crop_scale=(0.5, 1.5))


def test_sample_augment_batch_equals_one_image_at_a_time():
    aug = SampleAugment(degrees=15, jitter=0.3)
    x = torch.rand(4, 3, 24, 20)
    seeds = [3, 9, 27, 81]
    one = torch.stack([aug(x[i], s) for i, s in enumerate(seeds)])
    assert torch.equal(aug.apply_batch(x, seeds), one)
    grey = torch.rand(4, 1, 24, 20)  # jitter is for RGB only
    assert torch.equal(aug.apply_batch(grey, seeds)[2], aug(grey[2], 27))


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    """A JPEG read at a quarter of its size is decoded at a reduced DCT scale (draft mode):
    close to a full decode + resize, and the same in the streamed and in-memory readers."""
    from tripletlab.data.loaders import _read_image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 480)[None, :, None]
    arr = (rng.random((320, 480, 3)) * 30 + ramp).astype(np.uint8)
    path = tmp_path / "big.jpg"
    Image.fromarray(arr).save(path, quality=92)
    got = _read_image(str(path), "RGB", (80, 120))
    with Image.open(path) as im:
        full = np.asarray(im.convert("RGB").resize((120, 80), Image.BILINEAR))
    assert got.shape == (3, 80, 120)
    assert np.abs(got.astype(float) - full.transpose(2, 0, 1)).mean() < 4.0
    grey = _read_image(str(path), "L", (80, 120))
    assert grey.shape == (1, 80, 120)
    files = ImageFiles([str(path)], [0], (80, 120), 3)
    assert torch.equal(files.decode(0), torch.from_numpy(got.copy()))


def _batches(stream, n):
    return [next(stream) for _ in range(n)]


def test_pk_stream_workers_match_and_resume_exactly(tmp_path):
    root = make_folder(tmp_path / "d")
    f = files_of(root, augment=SampleAugment())
    y = f.labels
    ref = _batches(PKStream(f, PKSampler(y, p=2, k=3, seed=1), workers=0, seed=5), 12)
    assert all(len(b[1]) == 6 for b in ref)
    par = _batches(PKStream(f, PKSampler(y, p=2, k=3, seed=1), workers=2, seed=5), 12)
    for (x0, y0, i0), (x1, y1, i1) in zip(ref, par, strict=True):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(i0, i1)
    # consume 5 batches (the loader has read ahead), save, resume in a new stream
    s = PKStream(f, PKSampler(y, p=2, k=3, seed=1), workers=2, seed=5)
    _batches(s, 5)
    state = json.loads(json.dumps(s.state_dict()))
    s.close()
    sampler = PKSampler(y, p=2, k=3, seed=1)
    sampler.load_state_dict(state)
    resumed = _batches(PKStream(f, sampler, workers=2, seed=5), 7)
    for (x0, _, i0), (x1, _, i1) in zip(ref[5:], resumed, strict=True):
        assert torch.equal(i0, i1) and torch.equal(x0, x1)


def test_cache_gives_the_same_batches(tmp_path):
    root = make_folder(tmp_path / "d", rgb=True)
    f = files_of(root, channels=3, augment=SampleAugment(jitter=0.2))
    ref = _batches(PKStream(f, PKSampler(f.labels, p=2, k=2, seed=0)), 4)
    f.build_cache(workers=2)
    assert f.cache is not None and f.cache.dtype == torch.uint8 and f.cache.is_shared()
    cached = _batches(PKStream(f, PKSampler(f.labels, p=2, k=2, seed=0), workers=2), 4)
    for a, b in zip(ref, cached, strict=True):
        assert torch.equal(a[0], b[0])


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_image_mid_epoch(tmp_path, workers):
    root = make_folder(tmp_path / "d")
    bad = root / "c2" / "3.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    f = files_of(root)
    stream = PKStream(f, PKSampler(f.labels, p=4, k=6, seed=0), workers=workers)
    with pytest.raises(FileFormatError, match=r"c2/3\.png.*--skip-bad"):
        _batches(stream, 3)
    stream = PKStream(f, PKSampler(f.labels, p=4, k=6, seed=0), workers=workers, skip_bad=True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        out = _batches(stream, 3)
    assert stream.skipped == 3 and [len(b[1]) for b in out] == [23, 23, 23]


class _Dies(ImageFiles):
    def __getitem__(self, key):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(key)


def test_dead_worker_is_a_clear_error(tmp_path):
    root = make_folder(tmp_path / "d")
    paths, labels = scan_images(root)
    f = _Dies(paths, class_ids(labels)[0], (16, 16), 1)
    stream = PKStream(f, PKSampler(f.labels, p=2, k=2, seed=0), workers=1)
    with pytest.raises(DataWorkerError, match="worker process died"):
        _batches(stream, 2)


def test_embed_files_streams_and_skips(tmp_path):
    root = make_folder(tmp_path / "d")
    f = files_of(root)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 5))
    x = torch.stack([f[i][0] for i in range(len(f))])
    emb, kept = embed_files(model, f, batch_size=7, workers=2)
    assert kept == list(range(len(f)))
    assert torch.allclose(emb, model(x), atol=1e-6)
    (root / "c0" / "1.png").write_bytes(b"")
    with pytest.raises(FileFormatError, match="empty image file"):
        embed_files(model, f, batch_size=7)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        emb, kept = embed_files(model, f, batch_size=7, skip_bad=True)
    assert len(kept) == len(f) - 1 and 1 not in kept and emb.shape == (len(f) - 1, 5)


def test_a_batch_lost_with_its_worker_is_a_worker_error():
    """A worker that dies after queuing a batch leaves the main process a broken connection
    to the batch's shared memory: that is a dead worker too, not a raw ConnectionResetError."""
    from tripletlab.data.streaming import DataWorkerError, _guard

    class Broken:
        num_workers = 1

        def __iter__(self):
            return self

        def __next__(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(DataWorkerError, match="worker process died.*ConnectionResetError"):
        next(_guard(Broken()))


def test_sigchld_handler_reports_dead_workers_only_where_batches_are_read():
    import signal as sig

    from tripletlab.data.streaming import _defer_sigchld

    previous = sig.getsignal(sig.SIGCHLD)
    calls = []

    def torch_like(signum, frame):  # what PyTorch installs: raises wherever the main thread is
        calls.append(signum)
        if len(calls) == 1:
            raise RuntimeError("DataLoader worker (pid 123) is killed by signal: Killed.")
        raise RuntimeError("something else")

    sig.signal(sig.SIGCHLD, torch_like)
    try:
        _defer_sigchld()
        _defer_sigchld()  # wrapped once
        handler = sig.getsignal(sig.SIGCHLD)
        assert handler is not torch_like and handler._tripletlab_deferred
        handler(sig.SIGCHLD, None)  # the dead-worker error is dropped here
        with pytest.raises(RuntimeError, match="something else"):
            handler(sig.SIGCHLD, None)
        assert calls == [sig.SIGCHLD, sig.SIGCHLD]
    finally:
        sig.signal(sig.SIGCHLD, previous)
