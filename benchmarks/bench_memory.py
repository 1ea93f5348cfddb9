"""Peak resident memory (RSS, the process plus its data-loading workers, sampled every 0.1 s)
of `tripletlab train` (streamed) and `tripletlab embed` on generated JPEG folders.

    python benchmarks/make_jpeg_folder.py /tmp/jpeg20k --n 20000 --classes 500
    python benchmarks/make_jpeg_folder.py /tmp/jpeg60k --n 60000 --classes 1500 --seed 1
    python benchmarks/bench_memory.py /tmp/jpeg20k /tmp/jpeg60k --work /tmp/membench

The model is a 2-block CNN (8, 16 channels) at 224x224 RGB (memory is about the data pipeline,
not the model); training runs ``--steps`` steps with no evaluation; embed covers every image
of the folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil


def peak_rss(cmd: list[str], env: dict, max_seconds: float = 0) -> tuple[int, float, int]:
    """(peak RSS of the process tree in bytes, seconds, exit code). With ``max_seconds`` the
    command is stopped after that long (exit code -9: the peak is then over that time only)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        if max_seconds and time.perf_counter() - t > max_seconds:
            for p in [*root.children(recursive=True), root]:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            proc.wait()
            break
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            peak = max(peak, total)
        except psutil.Error:
            pass
        time.sleep(0.1)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        print(err[-2000:], file=sys.stderr)
    return peak, time.perf_counter() - t, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+")
    ap.add_argument("--work", default="/tmp/tl-membench")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--what", nargs="+", default=["train", "embed"])
    ap.add_argument("--max-seconds", type=float, default=0, help="stop embed after this long")
    ap.add_argument("--model", default=None, help="embed with this run (default: the trained one)")
    a = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    tl = [sys.executable, "-m", "tripletlab"]
    work = Path(a.work)
    for folder in a.folders:
        n = sum(1 for _ in Path(folder).rglob("*.jpg"))
        run = work / f"run-{Path(folder).name}"
        work.mkdir(parents=True, exist_ok=True)
        small = work / "small_cnn.json"
        small.write_text(json.dumps({"model_options": {"channels": [8, 16]}, "embedding_dim": 32}))
        common = [
            "--quiet",
            "--no-report",
            "--threads",
            str(a.threads),
            "--device",
            "cpu",
            "--config",
            str(small),
        ]
        train = [
            *tl,
            "train",
            "--data",
            folder,
            "--out",
            str(run),
            "--image-size",
            "224",
            "224",
            "--steps",
            str(a.steps),
            "--no-eval",
            "--stream",
            "--workers",
            str(a.workers),
            "--p",
            "16",
            "--k",
            "4",
            *common,
        ]
        if "train" in a.what:
            if run.exists():
                import shutil

                shutil.rmtree(run)
            rss, secs, rc = peak_rss(train, env)
            print(
                json.dumps(
                    {
                        "what": "train",
                        "images": n,
                        "steps": a.steps,
                        "peak_rss_mib": round(rss / 2**20),
                        "seconds": round(secs),
                        "rc": rc,
                    }
                ),
                flush=True,
            )
        if "embed" in a.what:
            if a.model:
                run = Path(a.model)
            if not (run / "model.safetensors").exists():
                subprocess.run(
                    [
                        *train[: train.index("--steps") + 1],
                        "1",
                        *train[train.index("--steps") + 2 :],
                    ],
                    env=env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            embed = [
                *tl,
                "embed",
                "--model",
                str(run),
                "--data",
                folder,
                "--out",
                str(work / f"emb-{Path(folder).name}.npz"),
                "--workers",
                str(a.workers),
                "--device",
                "cpu",
            ]
            rss, secs, rc = peak_rss(embed, env, a.max_seconds)
            print(
                json.dumps(
                    {
                        "what": "embed",
                        "images": n,
                        "peak_rss_mib": round(rss / 2**20),
                        "seconds": round(secs),
                        "images_per_s": round(n / secs) if rc == 0 else None,
                        "completed": rc == 0,
                        "rc": rc,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
