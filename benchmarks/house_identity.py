"""Behaviour-identity check for refactors: fixed-seed runs whose weights must not change.

Runs a handful of short, seeded ``tripletlab train`` jobs (each in its own process, one thread)
and prints the sha256 of each run's ``model.safetensors`` and the headline test metric, as JSON.
Run it on two commits and compare the files::

    PYTHONPATH=OLD_CHECKOUT/src python benchmarks/house_identity.py --out /tmp/before
    python benchmarks/house_identity.py --out /tmp/after --compare /tmp/before/identity.json

``--keep-checkpoint`` also leaves a run stopped at step 20 (``resume20``) whose checkpoint a later
commit must resume: ``--resume-from /tmp/before/resume20`` continues it to step 40 and compares the
result with a fresh 40-step run of the same config (``resume_fresh``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
ATT = DATA / "att_faces"
WORDNET = DATA / "wordnet" / "hyponym_glosses.csv"

COMMON = ["--threads", "1", "--quiet", "--no-report", "--seed", "0"]


def runs(tmp: Path) -> dict[str, list[str]]:
    """name -> train arguments (without --out)."""
    text = tmp / "text.csv"
    if WORDNET.exists() and not text.exists():
        with open(WORDNET, encoding="utf-8") as f, open(text, "w", newline="") as g:
            rows = list(csv.reader(f))
            head, body = rows[0], rows[1:]
            labels = sorted({r[1] for r in body})[:12]
            w = csv.writer(g)
            w.writerow(head)
            w.writerows(r for r in body if r[1] in labels)
    triplets = tmp / "triplets.csv"
    if not triplets.exists():
        with open(triplets, "w", newline="") as g:
            w = csv.writer(g)
            w.writerow(["anchor", "positive", "negative"])
            words = ["cat", "dog", "car", "bus", "red", "blue", "tree", "fish"]
            for i in range(48):
                a, n = words[i % 8], words[(i + 3) % 8]
                w.writerow([f"a {a} {i}", f"the {a}", f"a {n} {i}"])
    out = {
        "digits_default": ["--data", "digits", "--steps", "60"],
        "digits_xbm": [
            "--data",
            "digits",
            "--steps",
            "60",
            "--memory-size",
            "512",
            "--memory-warmup",
            "10",
        ],
        "digits_hard_class": [
            "--data",
            "digits",
            "--steps",
            "60",
            "--sampler",
            "hard-class",
            "--hard-class-every",
            "20",
            "--p",
            "4",
        ],
        "digits_semihard_patience": [
            "--data",
            "digits",
            "--steps",
            "80",
            "--strategy",
            "semihard",
            "--eval-every",
            "10",
            "--patience",
            "2",
        ],
    }
    if ATT.exists():
        out["att_recipe"] = ["--data", str(ATT), "--config", "att_faces", "--steps", "40"]
        out["att_streamed"] = [
            "--data",
            str(ATT),
            "--stream",
            "--workers",
            "1",
            "--steps",
            "20",
            "--image-size",
            "56",
            "46",
        ]
        out["att_pretrained_frozen"] = [
            "--data",
            str(ATT),
            "--config",
            "att_faces_pretrained",
            "--steps",
            "20",
        ]
        out["att_freeze_stages_cache"] = [
            "--data",
            str(ATT),
            "--config",
            "att_faces_pretrained",
            "--freeze-stages",
            "4",
            "--augment",
            "flip",
            "--backbone-lr-mult",
            "0.01",
            "--steps",
            "10",
        ]
    minilm = ["--model", "minilm", "--steps", "4", "--p", "4", "--k", "2"]
    if text.exists():
        out["text_minilm"] = ["--data", str(text), *minilm]
    out["text_triplets"] = ["--data", str(triplets), *minilm]
    return out


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def train(args: list[str], out: Path) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tripletlab", "train", *args, *COMMON, "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return p.returncode, (p.stdout + p.stderr)[-2000:]


def record(run: Path, rc: int, log: str, seconds: float) -> dict:
    ev = run / "eval.json"
    evj = json.loads(ev.read_text()) if ev.exists() else {}
    headline = (evj.get("retrieval") or {}).get("map_at_r", evj.get("triplet_accuracy"))
    return {
        "rc": rc,
        "model_sha256": sha(run / "model.safetensors"),
        "best_step": evj.get("best_step"),
        "headline": headline,
        "seconds": round(seconds, 1),
        **({"log": log} if rc else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--compare")
    ap.add_argument("--keep-checkpoint", action="store_true")
    ap.add_argument("--resume-from")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {}
    for name, args in runs(out).items():
        if a.only and name not in a.only:
            continue
        run = out / name
        shutil.rmtree(run, ignore_errors=True)
        t = time.perf_counter()
        rc, log = train(args, run)
        result[name] = record(run, rc, log, time.perf_counter() - t)
        print(name, json.dumps(result[name]), flush=True)
    base = ["--data", "digits", "--checkpoint-every", "10"]
    if a.keep_checkpoint:
        run = out / "resume20"
        shutil.rmtree(run, ignore_errors=True)
        rc, log = train([*base, "--steps", "20"], run)
        result["resume20"] = record(run, rc, log, 0)
    if a.resume_from:
        src = out / "resumed"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(a.resume_from, src)
        cmd = [
            sys.executable,
            "-m",
            "tripletlab",
            "train",
            "--resume",
            str(src),
            "--steps",
            "40",
            "--quiet",
            "--no-report",
        ]  # the saved config already holds threads 1 (a resume takes no other options)
        p = subprocess.run(cmd, capture_output=True, text=True)
        result["resumed_old_checkpoint"] = record(src, p.returncode, p.stdout + p.stderr, 0)
        fresh = out / "resume_fresh"
        shutil.rmtree(fresh, ignore_errors=True)
        rc, log = train([*base, "--steps", "40"], fresh)
        result["resume_fresh"] = record(fresh, rc, log, 0)
        same = (
            result["resumed_old_checkpoint"]["model_sha256"]
            == result["resume_fresh"]["model_sha256"]
        )
        print("old checkpoint resumed to the same model as a fresh run:", same)
    (out / "identity.json").write_text(json.dumps(result, indent=1))
    if a.compare:
        before = json.loads(Path(a.compare).read_text())
        bad = 0
        for name, r in result.items():
            if name not in before:
                continue
            same = r["model_sha256"] == before[name]["model_sha256"]
            bad += not same
            print(f"{'same' if same else 'DIFFERENT':9s} {name}")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
