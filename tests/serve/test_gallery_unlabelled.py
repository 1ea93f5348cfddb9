"""Serve: a gallery enrolled without labels (the file is the id) and the threshold's
calibration in /info and /verify (issue #24)."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import pytest

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'tripletlab[serve]'")
pytest.importorskip("httpx", reason="needs the serve extra (httpx)")

from tripletlab.cli import main  # noqa: E402

from conftest import make_image_folder  # noqa: E402


def test_unlabelled_enrolment_and_calibration_facts(tmp_path):
    from fastapi.testclient import TestClient

    from tripletlab.serve import create_app

    data = make_image_folder(tmp_path / "imgs", n_classes=8, per_class=4, size=(16, 12))
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--steps", "5", "--p", "3"]
    args += ["--k", "3", "--test-classes", "class6,class7", "--val-fraction", "0.4"]
    with redirect_stdout(io.StringIO()):
        assert (
            main([*args, "--embedding-dim", "8", "--quiet", "--no-report", "--threads", "1"]) == 0
        )
    a, b = sorted((data / "class0").glob("*.png"))[:1] + sorted((data / "class1").glob("*.png"))[:1]
    with TestClient(create_app(run)) as c:
        info = c.get("/info").json()["threshold_info"]
        assert info["threshold_rule"] == "target-far" and len(info["validation_far_ci"]) == 2
        files = [("images", ("alice.png", a.read_bytes())), ("images", ("bob.png", b.read_bytes()))]
        r = c.post("/gallery", files=files)
        assert r.status_code == 201, r.text
        assert r.json()["label"] == ["alice.png", "bob.png"]
        hit = c.post("/search", files={"image": ("q.png", b.read_bytes())}, data={"k": 1}).json()
        assert hit["neighbours"][0]["label"] == "bob.png"
        v = c.post(
            "/verify",
            files={"image_a": ("a.png", a.read_bytes()), "image_b": ("b.png", b.read_bytes())},
        ).json()
        assert v["target_far"] == 0.01 and len(v["far_ci"]) == 2 and v["calibration_warning"]
        bad = c.post("/gallery", files=[("images", ("x.png", a.read_bytes()))], data={"label": " "})
        assert bad.status_code == 422
