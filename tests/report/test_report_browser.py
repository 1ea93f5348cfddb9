"""The report of a real (tiny) run, opened from disk in headless Chromium.

Skipped with a reason where Chromium is not installed (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from tripletlab.cli import main

from conftest import make_image_folder

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("report")
    data = make_image_folder(base / "imgs", n_classes=6, per_class=6, size=(16, 12))
    run = base / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(run),
                "--steps",
                "10",
                "--p",
                "3",
                "--k",
                "3",
                "--test-classes",
                "class4,class5",
                "--embedding-dim",
                "8",
                "--quiet",
                "--eval-every",
                "5",
            ]
        )
        == 0
    )  # writes report.html at the end
    return run


def test_report_files_reference_every_plot(report_run):
    html = (report_run / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.stem for p in (report_run / "plots").glob("*.png"))
    assert pngs == sorted(
        [
            "training_curves",
            "distance_histograms",
            "embedding_map",
            "worst_queries",
            "retrieval_gallery",
            "roc",
        ]
    )
    for name in pngs:
        m = re.search(rf"data-plot='{name}' src='data:image/png;base64,([^']+)'", html)
        assert m, name
        img = Image.open(io.BytesIO(base64.b64decode(m.group(1))))
        assert img.size[0] > 100 and img.size[1] > 100
    for heading in (
        "Training",
        "Distances on the held-out split",
        "Embedding map",
        "Retrieval",
        "Verification",
        "Run",
    ):
        assert f"<h2>{heading}" in html
    assert "<caption>per class, the worst first (MAP@R ascending)</caption>" in html
    assert (report_run / "per_class_retrieval.csv").read_text().count("\n") == 3  # 2 classes


def test_report_renders_in_headless_chromium(report_run, tmp_path):
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("Chromium is not installed (Debian package 'chromium'; .ci/run installs it)")
    url = (report_run / "report.html").resolve().as_uri()
    shot = tmp_path / "shot.png"
    common = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-500:]
    assert "tripletlab report" in dom.stdout and dom.stdout.count("<img") == 6
    r = subprocess.run(
        [*common, f"--screenshot={shot}", "--window-size=1280,1800", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and shot.exists(), r.stderr[-500:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20  # not a blank page
    assert len(np.unique(pixels.reshape(-1, 3)[::97], axis=0)) > 50  # plots, not just text
