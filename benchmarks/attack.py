"""Rerun issue #25's attack table: each row is a test that reproduces the attack (real server
and CLI processes on 127.0.0.1, torchrun for the distributed row); prints the table as
Markdown (docs/reliability.md) with ok / FAILED per row and the command that reproduces it.

    python benchmarks/attack.py                 # every row (~15 min on a loaded 2-core machine)
    python benchmarks/attack.py --rows 1 5      # some rows
    python benchmarks/attack.py --load          # also the load figures (AT&T faces, needs data)

The load figures: a tiny model on AT&T s1-s30 serving a gallery of s31-s40; 16 and 32 clients
send searches (``tripletlab.serve.loadtest.run_load``), then 8 clients search while 2 send a
LAB TIFF for a few seconds (the status counts of each kind).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
A = "tests/serve/test_attack.py::"
U = "tests/serve/test_serve_units.py::"
R = "tests/system/test_reliability.py::"
D = "tests/train/test_distributed_train.py::"

#: (row, what the attack did, the tests that reproduce it)
ROWS = [
    ("1", "a LAB TIFF batched with other users' searches",
     [A + "test_one_bad_image_fails_only_its_own_request",
      U + "test_batch_queue_isolates_a_failing_item_to_its_own_job"]),
    ("2", "two servers on one --index",
     [A + "test_a_second_server_on_the_same_index_refuses_to_start",
      U + "test_gallery_lock_and_rollback_of_a_failed_commit"]),
    ("3", "32 x 4096x4096 RGBA PNGs in one /embed; bomb message",
     [A + "test_request_pixel_budget_is_checked_before_decoding",
      U + "test_pixel_budget_refuses_beyond_the_limit_and_releases"]),
    ("4", "export/embed --out /dev/full (and a FIFO)",
     [A + "test_out_refuses_to_replace_a_device_or_fifo",
      R + "test_atomic_writers_refuse_what_is_not_a_regular_file"]),
    ("5", "--token '' ($UNSET_VAR)", [A + "test_empty_token_is_refused_at_start_up"]),
    ("6", "DELETE /gallery/<huge> during 8 concurrent enrolers",
     [A + "test_huge_ids_are_4xx_and_concurrent_writes_stay_consistent"]),
    ("7", "chmod 000 class folder",
     [A + "test_unreadable_class_folder_is_an_error_naming_it",
      "tests/data/test_hostile_inputs.py::test_an_unlistable_class_folder_is_an_error_or_a_warning"]),
    ("8", "SIGKILL a rank at a checkpoint, torchrun --resume",
     [D + "test_a_killed_rank_resumes_to_the_bytes_of_an_uninterrupted_run"]),
    ("m1", "--threshold nan, --port 70000, port in use",
     [A + "test_bad_serve_options_exit_1_with_a_message"]),
    ("m2", "slow headers, unauthenticated multipart body, /redoc CDN",
     [A + "test_slow_clients_unauthenticated_bodies_and_redoc"]),
    ("m3", "JSON /embed: deep nesting, 400-digit integer",
     [A + "test_json_bombs_get_422_from_a_vector_model"]),
    ("m4", "config.json 10^400 / \"train\": \"oops\" / FIFO; --config FIFO",
     [R + "test_hostile_run_and_config_files_are_clear_errors"]),
    ("m5", "CSV field over 131,072 characters; label 1e30 in .npy",
     ["tests/data/test_hostile_inputs.py::test_a_csv_field_over_the_limit_names_the_file_and_line",
      "tests/data/test_hostile_inputs.py::test_a_label_of_1e30_is_an_error_not_int64_min"]),
    ("m6", "NaN vectors / kind hnsw over a flat file in an index",
     ["tests/index/test_index.py::test_load_rejects_nan_vectors_and_a_kind_its_file_is_not"]),
    ("m7", "checkpoint write killed on a full disk",
     [R + "test_a_killed_checkpoint_write_leaves_no_directory_behind"]),
]  # fmt: skip


def run_rows(rows: list[tuple[str, str, list[str]]], timeout_s: float) -> dict[str, dict]:
    """Run every test of ``rows`` in one pytest process; ``node id -> {"ok", "seconds"}``."""
    nodes = [n for _, _, ns in rows for n in ns]
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={xml}", *nodes]  # fmt: skip
        subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout_s, check=False)
        out = {}
        for case in ET.parse(xml).getroot().iter("testcase"):
            path = case.get("file") or case.get("classname", "").replace(".", "/") + ".py"
            node = f"{path}::{case.get('name')}"
            bad = case.find("failure") is not None or case.find("error") is not None
            skipped = case.find("skipped") is not None
            out[node] = {"ok": not bad and not skipped, "skipped": skipped,
                         "seconds": float(case.get("time", 0))}  # fmt: skip
    return out


def _result(results: dict, node: str) -> dict:
    name = node.split("::", 1)[1]
    hits = [v for k, v in results.items() if k.split("::", 1)[1].startswith(name)]
    if not hits:
        return {"ok": False, "skipped": False, "seconds": 0.0, "missing": True}
    return {
        "ok": all(h["ok"] for h in hits),
        "skipped": any(h["skipped"] for h in hits),
        "seconds": sum(h["seconds"] for h in hits),
    }


def table(rows, results) -> str:
    lines = ["| row | attack | result | seconds | reproduce with |", "|---|---|---|---|---|"]
    for row, what, nodes in rows:
        rs = [_result(results, n) for n in nodes]
        status = "ok" if all(r["ok"] for r in rs) else (
            "skipped" if any(r["skipped"] for r in rs) else "FAILED")  # fmt: skip
        cmd = "<br>".join(f"`pytest {n}`" for n in nodes)
        lines.append(f"| {row} | {what} | {status} | {sum(r['seconds'] for r in rs):.0f} | {cmd} |")
    return "\n".join(lines)


def load_figures(seconds: float) -> dict:
    """The load rows (see the module docstring); needs ../shared/data/att_faces."""
    import concurrent.futures as cf
    import io
    import shutil
    from collections import Counter

    import httpx
    from PIL import Image

    sys.path.insert(0, str(ROOT / "tests"))
    from tripletlab.serve.loadtest import run_load

    from conftest import SHARED_DATA
    from helpers import free_port, subprocess_env

    att = SHARED_DATA / "att_faces"
    base = Path(tempfile.mkdtemp(prefix="attack-load-"))
    env = subprocess_env()
    py = [sys.executable, "-m", "tripletlab"]
    subprocess.run([*py, "train", "--data", str(att), "--config", "att_faces", "--steps", "30",
                    "--image-size", "28", "23", "--threads", "1", "--no-report", "--quiet",
                    "--out", str(base / "run")], env=env, check=True, timeout=600)  # fmt: skip
    gallery, queries = base / "gallery", []
    for i in range(31, 41):
        (gallery / f"s{i}").mkdir(parents=True)
        for j in range(1, 8):
            shutil.copy(att / f"s{i}" / f"{j}.pgm", gallery / f"s{i}" / f"{j}.pgm")
        queries += [att / f"s{i}" / f"{j}.pgm" for j in (8, 9, 10)]
    subprocess.run([*py, "index", "--model", str(base / "run"), "--data", str(gallery),
                    "--out", str(base / "index")], env=env, check=True, timeout=600)  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(base / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([*py, "serve", "--model", str(base / "run"), "--index",
                               str(base / "index"), "--threads", "1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    out: dict = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        for clients in (16, 32):
            r = run_load(url, queries, clients=clients, requests=10, timeout_s=60)
            out[f"search_{clients}_clients"] = {
                k: r[k] for k in ("n", "errors", "p50_ms", "p99_ms", "wall_s", "throughput_rps")
            }
        buf = io.BytesIO()
        Image.new("LAB", (8, 8)).save(buf, "TIFF")
        bad, good = buf.getvalue(), [q.read_bytes() for q in queries]
        stop = time.monotonic() + seconds

        def client(i: int) -> Counter:
            c: Counter = Counter()
            with httpx.Client(timeout=60) as h:
                n = 0
                while time.monotonic() < stop:
                    data = bad if i < 2 else good[(i + n) % len(good)]
                    r = h.post(url + "/search", files={"image": ("q", data)})
                    c[f"{'lab_tiff' if i < 2 else 'good'} {r.status_code}"] += 1
                    n += 1
            return c

        with cf.ThreadPoolExecutor(10) as ex:
            counts = sum(ex.map(client, range(10)), Counter())
        out["mixed_8_good_2_lab_tiff"] = {"seconds": seconds, **dict(sorted(counts.items()))}
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all)")
    ap.add_argument("--load", action="store_true", help="also measure the load rows")
    ap.add_argument("--load-seconds", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="for the whole pytest run")
    args = ap.parse_args()
    rows = [r for r in ROWS if args.rows is None or r[0] in args.rows]
    t0 = time.time()
    results = run_rows(rows, args.timeout) if rows else {}
    print(table(rows, results))
    print(f"\n({time.time() - t0:.0f} s for the table)")
    if args.load:
        print(json.dumps(load_figures(args.load_seconds), indent=2))
    return 0 if all(_result(results, n)["ok"] for _, _, ns in rows for n in ns) else 1


if __name__ == "__main__":
    sys.exit(main())
