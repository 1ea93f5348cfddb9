"""``serve --faces`` (issue #26): a posted photo is detected and aligned first, the answers carry
the face's box, a photo without a face is a 422 with a clear message."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from faces_fixtures import *  # noqa: F403 - the fixtures mtcnn, att_face(s), _one_thread
from PIL import Image

from faces_in_scenes import paste_scene, texture
from tripletlab.cli import main
from tripletlab.inference import Inference

from conftest import make_image_folder

FAST = ["--steps", "6", "--eval-every", "3", "--embedding-dim", "8", "--quiet", "--no-report"]
pytestmark = pytest.mark.filterwarnings("ignore:.*inputs looked at differ")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("fastapi")
    base = tmp_path_factory.mktemp("faces_serve")
    data = make_image_folder(base / "imgs", n_classes=4, per_class=6, size=(16, 12))
    run = base / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--p", "2", "--k", "3"]
    assert main([*args, "--test-classes", "class3", "--val-fraction", "0", *FAST]) == 0
    return run


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def test_serve_detects_first_and_answers_the_box(tiny_run, att_faces, mtcnn, tmp_path):
    from fastapi.testclient import TestClient

    from tripletlab.serve import ServeSettings, create_app

    frame, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    other, _ = paste_scene([att_faces[1]], (240, 320), fixed=[(30, 20, 0.8)])
    empty = texture(120, 160, np.random.default_rng(3))
    scene = tmp_path / "scene.png"
    scene.write_bytes(_png(frame))
    app = create_app(tiny_run, settings=ServeSettings(threshold=0.5), faces="arcface")
    with TestClient(app) as c:
        r = c.post("/embed", files=[("images", ("a.png", _png(frame)))])
        assert r.status_code == 200, r.text
        body = r.json()
        (face,) = body["faces"]
        x1, y1, x2, y2 = face["box"]
        assert 80 < x1 < x2 < 90 + 0.9 * 92 + 10 and 40 < y1 < y2 < 50 + 0.9 * 112 + 10
        inf = Inference.from_run(tiny_run)
        inf.use_faces("arcface")
        np.testing.assert_allclose(body["embeddings"], inf.embed_files([str(scene)]), atol=1e-5)
        r = c.post("/search", files={"image": ("e.png", _png(empty))})
        assert r.status_code == 409  # empty gallery first
        r = c.post("/gallery", files={"images": ("a.png", _png(frame))}, data={"label": "s1"})
        assert r.status_code == 201, r.text
        r = c.post("/search", files={"image": ("q.png", _png(frame))}, data={"k": 1})
        hit = r.json()
        assert hit["neighbours"][0]["label"] == "s1" and hit["face"]["box"] == face["box"]
        r = c.post("/search", files={"image": ("e.png", _png(empty))})
        assert r.status_code == 422 and "no face found in the image" in r.json()["error"]["message"]
        r = c.post("/identify", files={"image": ("q.png", _png(frame))})
        assert r.json()["label"] == "s1" and "box" in r.json()["face"]
        files = {"image_a": ("a.png", _png(frame)), "image_b": ("b.png", _png(other))}
        v = c.post("/verify", files=files).json()
        assert len(v["faces"]) == 2 and v["faces"][1]["box"][0] < 60
        files = {"image_a": ("a.png", _png(frame)), "image_b": ("b.png", _png(empty))}
        r = c.post("/verify", files=files)
        assert r.status_code == 422 and "no face found in image 2 of 2" in r.text
    # without --faces: no box, the whole image
    with TestClient(create_app(tiny_run)) as c:
        body = c.post("/embed", files=[("images", ("e.png", _png(empty)))]).json()
        assert "faces" not in body and len(body["embeddings"]) == 1


class _Page:
    """The app served by uvicorn on a free port and a headless chromium on a phone-sized
    window (skips without selenium, uvicorn, httpx or Debian's chromium and its driver)."""

    def __init__(self, app, tmp_path):
        import shutil
        import socket
        import threading
        import time

        self.webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
        self.httpx = pytest.importorskip("httpx")
        uvicorn = pytest.importorskip("uvicorn")
        from selenium.webdriver.support.ui import WebDriverWait

        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        drv = shutil.which("chromedriver")
        if exe is None or drv is None:
            pytest.skip("needs Debian's chromium and chromium-driver")
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        cfg = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        self.driver = None
        for _ in range(200):
            if self.server.started:
                break
            time.sleep(0.05)
        opts = self.webdriver.ChromeOptions()
        opts.binary_location = exe
        for f in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                  "--window-size=390,844"]:  # fmt: skip
            opts.add_argument(f)
        try:
            self.driver = self.webdriver.Chrome(
                options=opts, service=self.webdriver.ChromeService(executable_path=drv)
            )
        except BaseException:
            self.close()
            raise
        self.driver.set_page_load_timeout(60)
        self.wait = WebDriverWait(self.driver, 60)

    def search(self, photo) -> None:
        """Open the page and pick ``photo`` as the query; waits for the results."""
        from selenium.webdriver.common.by import By

        self.driver.get(self.url + "/")
        inp = self.driver.find_element(By.ID, "search-file")
        self.driver.execute_script("arguments[0].hidden = false", inp)
        inp.send_keys(str(photo))
        self.wait.until(
            lambda d: d.find_element(By.ID, "results").get_attribute("data-state") == "done"
        )

    def box(self, el_id: str, width: int = 320) -> tuple[float, float, float]:
        """``(left, top, width)`` of a drawn box in the photo's pixels (when it is shown)."""
        from selenium.webdriver.common.by import By

        self.wait.until(lambda d: d.find_element(By.ID, el_id).get_attribute("hidden") is None)
        el = self.driver.find_element(By.ID, el_id)
        prev = self.driver.find_element(By.ID, "search-preview")
        scale = prev.size["width"] / width
        return (
            (el.location["x"] - prev.location["x"]) / scale,
            (el.location["y"] - prev.location["y"]) / scale,
            el.size["width"] / scale,
        )

    def close(self) -> None:
        if self.driver is not None:
            self.driver.quit()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_page_draws_the_face_box_in_headless_chromium(tiny_run, att_faces, mtcnn, tmp_path):
    from tripletlab.serve import create_app

    frame, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    scene = tmp_path / "scene.png"
    scene.write_bytes(_png(frame))
    from tripletlab.serve import ServeSettings

    settings = ServeSettings(threshold=0.5)
    page = _Page(create_app(tiny_run, settings=settings, faces="arcface"), tmp_path)
    try:
        r = page.httpx.post(page.url + "/gallery", files={"images": ("a.png", _png(frame))},
                            data={"label": "s1"})  # fmt: skip
        assert r.status_code == 201, r.text
        box = page.httpx.post(page.url + "/search", files={"image": ("q.png", _png(frame))})
        x1, _, x2, _ = box.json()["face"]["box"]
        page.search(scene)
        left, _, width = page.box("face-box")
        assert width == pytest.approx(x2 - x1, abs=8) and left == pytest.approx(x1, abs=8)
        # one face: no second box, the one line of identify
        assert page.driver.execute_script("return document.getElementById('face-box-1')") is None
        assert page.driver.find_element("id", "identify").text.startswith("Identified: s1 ")
    finally:
        page.close()


def test_page_draws_every_face_with_all_faces(tiny_run, att_faces, mtcnn, tmp_path):
    """``serve --faces --all-faces``: both faces of a photo boxed where the server found them,
    numbered, the largest chosen (green) with its neighbours; a click on the other box shows
    that face's neighbours."""
    from selenium.webdriver.common.by import By

    from tripletlab.serve import ServeSettings, create_app

    pair, _ = paste_scene(att_faces[:2], (240, 320), fixed=[(10, 10, 0.7), (180, 80, 1.0)])
    scene = tmp_path / "pair.png"
    scene.write_bytes(_png(pair))
    one, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    two, _ = paste_scene([att_faces[1]], (240, 320), fixed=[(30, 20, 0.8)])
    settings = ServeSettings(threshold=0.5, all_faces=True)
    page = _Page(create_app(tiny_run, settings=settings, faces="arcface"), tmp_path)
    try:
        for label, im in (("s1", one), ("s2", two)):
            r = page.httpx.post(page.url + "/gallery", files={"images": ("a.png", _png(im))},
                                data={"label": label})  # fmt: skip
            assert r.status_code == 201, r.text
        r = page.httpx.post(page.url + "/search", files={"image": ("p.png", _png(pair))}).json()
        faces = r["faces"]
        assert len(faces) == 2
        page.search(scene)
        d = page.driver
        for i, f in enumerate(faces):
            x1, y1, x2, _ = f["face"]["box"]
            left, top, width = page.box("face-box" if i == 0 else f"face-box-{i}")
            assert (left, top, width) == pytest.approx((x1, y1, x2 - x1), abs=4), i
        first, second = d.find_element(By.ID, "face-box"), d.find_element(By.ID, "face-box-1")
        assert first.text == "1" and second.text == "2"
        assert "chosen" in first.get_attribute("class").split()
        assert "chosen" not in second.get_attribute("class").split()
        assert first.value_of_css_property("border-top-color") != second.value_of_css_property(
            "border-top-color"
        )
        lines = d.find_element(By.ID, "identify").text.splitlines()
        assert len(lines) == 2 and lines[0].startswith("Face 1 (largest): ")
        assert lines[1].startswith("Face 2: ")
        cards = d.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [int(c.get_attribute("data-id")) for c in cards] == [
            h["id"] for h in faces[0]["neighbours"]
        ]
        if os.environ.get("TRIPLETLAB_SCREENSHOT"):  # a look at the page
            Path(os.environ["TRIPLETLAB_SCREENSHOT"]).write_bytes(d.get_screenshot_as_png())
        second.click()
        page.wait.until(
            lambda d: d.find_element(By.ID, "results").get_attribute("data-face") == "1"
        )
        assert "chosen" in d.find_element(By.ID, "face-box-1").get_attribute("class").split()
        cards = d.find_elements(By.CSS_SELECTOR, "#results .result")
        assert [int(c.get_attribute("data-id")) for c in cards] == [
            h["id"] for h in faces[1]["neighbours"]
        ]
        width = d.execute_script("return [document.documentElement.scrollWidth, innerWidth]")
        assert width[0] <= width[1], width  # the larger preview still fits a phone
    finally:
        page.close()


def test_serve_onnx_runtime_with_faces(tiny_run, att_faces, mtcnn, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from fastapi.testclient import TestClient

    from tripletlab.serve import create_app

    frame, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    scene = tmp_path / "scene.png"
    scene.write_bytes(_png(frame))
    inf = Inference.from_run(tiny_run)
    inf.use_faces("arcface")
    with TestClient(create_app(tiny_run, runtime="onnx", faces="arcface")) as c:
        body = c.post("/embed", files=[("images", ("a.png", _png(frame)))]).json()
        assert len(body["faces"]) == 1
        np.testing.assert_allclose(body["embeddings"], inf.embed_files([str(scene)]), atol=1e-4)
        r = c.post(
            "/embed", files=[("images", ("e.png", _png(texture(80, 90, np.random.default_rng(1)))))]
        )
        assert r.status_code == 422 and "no face found" in r.text


def test_serve_all_faces_answers_one_result_per_face(tiny_run, att_faces, mtcnn):
    from fastapi.testclient import TestClient

    from tripletlab.serve import ServeSettings, create_app

    pair, _ = paste_scene(att_faces[:2], (240, 320), fixed=[(10, 10, 0.7), (180, 80, 1.0)])
    one, _ = paste_scene([att_faces[0]], (240, 320), fixed=[(90, 50, 0.9)])
    settings = ServeSettings(threshold=0.5, all_faces=True)
    with TestClient(create_app(tiny_run, settings=settings, faces="arcface")) as c:
        r = c.post("/gallery", files={"images": ("a.png", _png(one))}, data={"label": "s1"})
        assert r.status_code == 201
        r = c.post("/search", files={"image": ("p.png", _png(pair))}, data={"k": 1}).json()
        assert len(r["faces"]) == 2 and r["face"] == r["faces"][0]["face"]
        assert r["faces"][0]["face"]["box"][0] > 150 > r["faces"][1]["face"]["box"][0]
        assert r["neighbours"] == r["faces"][0]["neighbours"]
        assert all(f["neighbours"][0]["label"] == "s1" for f in r["faces"])
        who = c.post("/identify", files={"image": ("p.png", _png(pair))}).json()
        assert len(who["faces"]) == 2 and who["face"]["box"][0] > 150
        assert who["faces"][1]["face"]["box"][0] < 60
        r = c.post(
            "/search", files={"image": ("e.png", _png(texture(80, 90, np.random.default_rng(1))))}
        )
        assert r.status_code == 422 and "no face found in the image" in r.text
