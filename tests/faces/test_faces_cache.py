"""``RUN_DIR/faces_cache`` is bounded (issue #26): the most recently used entries are kept,
the others removed after each new entry, never one another process is reading or building;
each entry is built once, into a private folder renamed into place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_faces, tiny_run, _one_thread

from tripletlab.cli import main
from tripletlab.errors import InputError
from tripletlab.rundir.cache import cache_keep, cached_folder, lock_file, prune_cache

from helpers import subprocess_env

pytestmark = pytest.mark.filterwarnings("ignore:.*inputs looked at differ")


def _entries(cache: Path) -> set[str]:
    return {p.name for p in cache.iterdir() if not p.name.startswith(".")}


def _builder(calls: list):
    def build(tmp: Path) -> dict:
        calls.append(tmp.name)
        (tmp / "crop.png").write_bytes(b"x")
        return {"n": len(calls)}

    return build


def test_keeps_the_most_recently_used_entries(tmp_path):
    cache, calls, removed = tmp_path / "faces_cache", [], []
    build = _builder(calls)
    for k in ("a", "b", "c"):
        _, _, held, gone = cached_folder(cache, k, build, keep=3, log=removed.append)
        held.close()
        assert gone == []
    # reuse "a": not built again, and now the most recent
    entry, summary, held, _ = cached_folder(cache, "a", build, keep=3)
    held.close()
    assert summary == {"n": 1} and len(calls) == 3 and (entry / "crop.png").is_file()
    _, _, held, gone = cached_folder(cache, "d", build, keep=3, log=removed.append)
    held.close()
    assert gone == ["b"] and _entries(cache) == {"a", "c", "d"}
    assert len(removed) == 1 and "least recently used" in removed[0] and "keeping 3" in removed[0]
    _, _, held, gone = cached_folder(cache, "e", build, keep=3)
    held.close()
    assert gone == ["c"] and _entries(cache) == {"a", "d", "e"}
    assert not (cache / ".b.lock").exists() and not (cache / ".c.lock").exists()
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_an_entry_in_use_is_not_pruned(tmp_path):
    cache, calls = tmp_path / "faces_cache", []
    build = _builder(calls)
    _, _, reading, _ = cached_folder(cache, "a", build, keep=1)  # held: being read
    _, _, held, gone = cached_folder(cache, "b", build, keep=1)
    held.close()
    assert gone == [] and _entries(cache) == {"a", "b"}
    reading.close()  # read: it may go now
    assert prune_cache(cache, keep=1) == ["a"] and _entries(cache) == {"b"}
    # a building folder of a live process stays, of a dead one goes; a lock without entry goes
    live = cache / f".tmp-x-{os.getppid()}"
    dead = cache / ".tmp-y-999999999"
    live.mkdir()
    dead.mkdir()
    (cache / ".z.lock").write_text("")
    prune_cache(cache, keep=1)
    assert live.is_dir() and not dead.exists() and not (cache / ".z.lock").exists()

    # a failed build leaves nothing behind, and the next call builds again
    def boom(tmp: Path) -> dict:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        cached_folder(cache, "c", boom, keep=1)
    assert "c" not in _entries(cache) and not list(cache.glob(".tmp-c-*"))


def test_lock_file_shared_and_exclusive(tmp_path):
    p = tmp_path / ".k.lock"
    a, b = lock_file(p, exclusive=False), lock_file(p, exclusive=False)  # two readers
    assert lock_file(p, exclusive=True, blocking=False) is None
    a.close()
    b.close()
    w = lock_file(p, exclusive=True, blocking=False)
    assert w is not None and lock_file(p, exclusive=False, blocking=False) is None
    w.close()


def test_two_processes_build_one_entry_once(tmp_path):
    """Two processes ask for the same entry at once: one builds it, the other waits and reuses
    it (one build, both see the complete entry)."""
    cache, log = tmp_path / "faces_cache", tmp_path / "builds.txt"
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from tripletlab.rundir.cache import cached_folder
        def build(tmp):
            with open({str(log)!r}, "a") as f:
                f.write("built\\n")
            time.sleep(0.5)
            (tmp / "crop.png").write_bytes(b"x")
            return {{"ok": True}}
        entry, summary, held, _ = cached_folder(Path({str(cache)!r}), "k", build)
        assert summary == {{"ok": True}} and (entry / "crop.png").is_file()
        print("ok")
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env=subprocess_env(),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert log.read_text().splitlines() == ["built"]
    assert _entries(cache) == {"k"}


def test_cache_keep_from_the_environment(monkeypatch):
    monkeypatch.delenv("TRIPLETLAB_FACES_CACHE_KEEP", raising=False)
    assert cache_keep() == 8
    monkeypatch.setenv("TRIPLETLAB_FACES_CACHE_KEEP", "3")
    assert cache_keep() == 3
    for bad in ("0", "-1", "many"):
        monkeypatch.setenv("TRIPLETLAB_FACES_CACHE_KEEP", bad)
        with pytest.raises(InputError, match="TRIPLETLAB_FACES_CACHE_KEEP"):
            cache_keep()


def test_embed_faces_folders_keep_the_cache_bounded(
    tiny_run, att_faces, mtcnn, tmp_path, capsys, monkeypatch
):
    """Three folders embedded with --faces and a cache of 2: the two most recent remain, a note
    says which went; a reused folder is not aligned again."""
    import tripletlab.faces as faces_pkg

    monkeypatch.setenv("TRIPLETLAB_FACES_CACHE_KEEP", "2")
    calls = []
    real = faces_pkg.align_folder

    def counting(src, *a, **kw):
        calls.append(Path(src).name)
        return real(src, *a, **kw)

    monkeypatch.setattr(faces_pkg, "align_folder", counting)
    cache = tiny_run / "faces_cache"
    before = _entries(cache) if cache.is_dir() else set()
    folders = []
    for name in ("f0", "f1", "f2"):
        root = tmp_path / name
        write_person_photos(root, att_faces)  # noqa: F405 - from faces_fixtures
        folders.append(root)
    keys = []
    for i, root in enumerate([folders[0], folders[1], folders[0], folders[2]]):
        out = tmp_path / f"e{i}.npz"
        argv = ["embed", "--model", str(tiny_run), "--data", str(root), "--out", str(out)]
        assert main([*argv, "--faces", "arcface"]) == 0
        cap = capsys.readouterr()
        assert "faces (arcface): 4 of 4 images with a face" in cap.out
        new = _entries(cache) - before - set(keys)
        keys += sorted(new)
        if i == 3:  # f2 is new: f1 (least recently used; f0 was reused after it) goes
            assert "note: faces cache: removed the least recently used" in cap.err
            assert "keeping 2" in cap.err
    assert calls == ["f0", "f1", "f2"]  # f0's second use read the cache
    k0, k1, k2 = keys
    assert _entries(cache) == {k0, k2}
    summary = json.loads((cache / k2 / ".summary.json").read_text())
    assert summary["out"] == str(cache / k2) and summary["with_face"] == 4
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
