"""Every command block of README.md, run as a reader would, in a temporary directory.

The README's ```python blocks run as scripts; each line of a ```bash block runs as a real
process (``tripletlab`` is this interpreter's ``python -m tripletlab``), in order, in one
directory that holds what the README names: a ``photos/`` folder of class folders and the
images ``query.jpg``, ``a.jpg``, ``b.jpg``. Each must exit 0 without a traceback. Three kinds of
line are checked rather than run:

- ``make TARGET``: the target exists in the Makefile (running it installs a venv and runs this
  suite);
- ``pip install ...``: what it installs is pinned in the Makefile or is an extra of
  pyproject.toml (no network in the tests);
- ``tripletlab serve``: runs, on a free port, until ``GET /healthz`` answers 200, then stops.

``tripletlab train`` lines without ``--steps`` get ``--steps 20``, so the suite stays minutes
long; the automatic choice of steps is tested in tests/train.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from conftest import make_image_folder

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every fenced block of ``text``."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def command_lines(body: str) -> list[list[str]]:
    """The commands of a bash block as argument lists (continuations joined, comments out)."""
    out = []
    for line in body.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def test_the_readme_has_the_blocks_this_test_runs():
    kinds = [lang for lang, _ in blocks(README.read_text())]
    assert "python" in kinds and kinds.count("bash") >= 2, kinds
    first = command_lines(blocks(README.read_text())[0][1])
    assert first[:2] == [["make", "demo"], ["make", "test"]]  # the project guide's two commands


def test_the_readme_stays_short():
    """A user's README (issue #24: 444 lines of lab notebook became docs/ pages)."""
    n = len(README.read_text().splitlines())
    assert n <= 200, f"README.md has {n} lines; move detail to docs/"


def _check_make(argv: list[str]) -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target in argv[1:]:
        assert re.search(rf"^{re.escape(target)}:", makefile, re.MULTILINE), target


def _check_pip(argv: list[str]) -> None:
    assert argv[:2] == ["pip", "install"], argv
    pyproject = (ROOT / "pyproject.toml").read_text()
    section = pyproject.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", section, re.MULTILINE))
    makefile = (ROOT / "Makefile").read_text()
    for spec in (a for a in argv[2:] if not a.startswith("-") or a == "-e"):
        if spec == "-e":
            continue
        if spec.startswith("."):  # the checkout, maybe with extras: .[serve]
            for extra in re.findall(r"\w+", spec[1:]):
                assert extra in extras, f"README names an extra pyproject lacks: {extra}"
        else:
            assert spec in makefile, f"README installs {spec}, the Makefile does not"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(argv: list[str], cwd: Path, env: dict) -> None:
    port = _free_port()
    cmd = [sys.executable, "-m", "tripletlab", *argv[1:], "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"serve exited: {proc.stdout.read()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(1)
        pytest.fail(f"serve did not answer /healthz on port {port} within 180 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _reader_dir(tmp_path: Path) -> Path:
    """What the README's commands name, made small: photos/<person>/<image>, three JPEGs."""
    make_image_folder(tmp_path / "photos", n_classes=6, per_class=6, size=(24, 20))
    for name, src in [("query.jpg", "class0/img0.png"), ("a.jpg", "class1/img1.pgm")]:
        Image.open(tmp_path / "photos" / src).convert("L").save(tmp_path / name)
    Image.open(tmp_path / "photos/class1/img2.bmp").convert("L").save(tmp_path / "b.jpg")
    return tmp_path


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path):
    cwd = _reader_dir(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, (lang, body) in enumerate(blocks(README.read_text())):
        if lang == "python":
            script = cwd / f"block{n}.py"
            script.write_text(body)
            p = subprocess.run(
                [sys.executable, str(script)],
                cwd=cwd,
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert p.returncode == 0, f"README python block {n}:\n{body}\n{p.stderr}"
            continue
        if lang != "bash":
            continue
        for argv in command_lines(body):
            if argv[0] == "make":
                _check_make(argv)
            elif argv[0] == "pip":
                _check_pip(argv)
            elif argv[:2] == ["tripletlab", "serve"]:
                _serve(argv, cwd, env)
            else:
                assert argv[0] == "tripletlab", f"README command of an unknown kind: {argv}"
                if argv[1] == "train" and "--steps" not in argv:
                    argv = [*argv, "--steps", "20"]
                p = subprocess.run(
                    [sys.executable, "-m", "tripletlab", *argv[1:]],
                    cwd=cwd,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                shown = " ".join(argv)
                assert p.returncode == 0, f"{shown}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
                assert "Traceback" not in p.stderr, f"{shown}\n{p.stderr[-3000:]}"
    assert (cwd / "runs/photos/report.html").exists()
    assert (cwd / "model.onnx").stat().st_size > 0
    assert (cwd / "gallery.idx").exists() and (cwd / "emb.npz").exists()
