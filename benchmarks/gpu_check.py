"""The GPU check: everything that needs CUDA, in one bounded run (<= 8 minutes), one results file.

    bash benchmarks/gpu_check.sh                    # on a machine with CUDA: run it all
    bash benchmarks/gpu_check.sh --dry-run          # anywhere: print the plan, run nothing
    python benchmarks/gpu_check.py --out gpu_check.json --budget 480

Steps (each a separate process with its own time limit, taken from what is left of the budget;
a step that fails or runs out of time is recorded as such and the next one starts):

1. ``tests``      -- the ``gpu``-marked tests (``pytest -m gpu``).
2. ``mining``     -- every strategy's step (forward + backward) on CUDA against the distance floor
                     (``pairwise_distance(e).sum()``) and pytorch-metric-learning, B = 1,024 to
                     16,384 (pml only where its memory estimate fits), time (CUDA-synchronised
                     median) and peak memory (``torch.cuda.max_memory_allocated``).
3. ``retrieval``  -- exact P@1 and MAP@R at 1,000,000 x 128 (1,000 classes of 1,000): faiss-gpu
                     (``GpuIndexFlatL2``) when present, else blocked GEMM + ``topk`` in torch on
                     the GPU; the torch path is checked against the library's
                     ``retrieval_metrics`` on a 20,000-item subset.
4. ``train``      -- 200 steps of MobileNetV2 (synthetic 224x224 JPEG folder) with ``--amp``
                     (bf16) and without: images/s, the loss is finite, final metrics.
5. ``export``     -- ``tripletlab export`` of the trained run (checked against PyTorch) and the
                     ONNX Runtime CUDA execution provider when present.

Without CUDA the check fails loudly (exit 1) instead of skipping: a GPU check that passes on a
machine without a GPU would say nothing. ``--dry-run`` prints the plan (steps, limits, commands)
and exits 0 on any machine; the test suite runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# step -> (share of the budget, what it does): shares sum to 1
STEPS: dict[str, tuple[float, str]] = {
    "tests": (0.12, "pytest -m gpu (the gpu-marked tests)"),
    "mining": (0.25, "all strategies vs the floor and pml, B = 1,024-16,384, time + peak memory"),
    "retrieval": (0.18, "P@1 / MAP@R at 1,000,000 x 128: faiss-gpu, else torch on the GPU"),
    "train": (0.35, "200 MobileNetV2 steps, --amp (bf16) and fp32: images/s, finite loss"),
    "export": (0.10, "tripletlab export + ONNX Runtime CUDA provider if present"),
}
MINING_SIZES = (1024, 4096, 16384)
MINING_STRATEGIES = ("all", "semihard", "hard")
RETRIEVAL_N, RETRIEVAL_CLASSES, RETRIEVAL_D = 1_000_000, 1000, 128
TRAIN_STEPS = 200


def plan(budget_s: float) -> list[dict[str, Any]]:
    """The steps with their time limits (seconds) and what runs in each."""
    out = []
    for name, (share, what) in STEPS.items():
        cmd = [sys.executable, str(Path(__file__)), "--step", name]
        out.append({"step": name, "limit_s": round(share * budget_s), "what": what, "cmd": cmd})
    return out


def _cuda_problem() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return (
            f"CUDA is not available to torch {torch.__version__} (a CPU build, no driver or no "
            "visible device): this check needs a GPU and does not skip"
        )
    return None


# ------------------------------------------------------------------------------------ steps


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _sync_time(fn, repeats: int, device="cuda") -> list[float]:
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def step_tests(work: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return {"ok": proc.returncode == 0, "summary": tail[0], "exit": proc.returncode}


def step_mining(work: Path, device: str = "cuda", sizes=MINING_SIZES) -> dict[str, Any]:
    """Every strategy, the floor and pml per B on ``device`` (CPU only for the smoke test)."""
    import torch

    sys.path.insert(0, str(HERE))
    from bench_mining import _make_loss_fn, estimate_gib, make_inputs

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    free = torch.cuda.mem_get_info()[0] / 2**30 if cuda else 4.0
    rows = []
    for b in sizes:
        x, y, lin = make_inputs(b, 128, 4)
        x, y, lin = x.to(dev), y.to(dev), lin.to(dev)
        impls = [("floor-dist", "all")] + [("tripletlab", s) for s in MINING_STRATEGIES]
        impls += [("pml", s) for s in MINING_STRATEGIES]
        floor = None
        for impl, strategy in impls:
            est = estimate_gib(impl, strategy, b)
            if impl == "pml" and est > 0.7 * free:
                rows.append({"b": b, "impl": impl, "strategy": strategy, "status": "skipped"})
                continue
            try:
                fn = _make_loss_fn(impl, strategy, 0.2)
            except ImportError:
                rows.append({"b": b, "impl": impl, "strategy": strategy, "status": "no pml"})
                continue

            def one(fn=fn, x=x, y=y, lin=lin):
                lin.zero_grad(set_to_none=True)
                out = fn(torch.nn.functional.normalize(lin(x), dim=1), y)
                (out[0] if isinstance(out, tuple) else out).backward()

            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            try:
                med = statistics.median(_sync_time(one, 5, dev))
            except torch.OutOfMemoryError:
                rows.append({"b": b, "impl": impl, "strategy": strategy, "status": "OOM"})
                continue
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            if impl == "floor-dist":
                floor = med
            rows.append(
                {
                    "b": b,
                    "impl": impl,
                    "strategy": strategy,
                    "status": "ok",
                    "time_s": med,
                    "x_floor": med / floor if floor else None,
                    "peak_mib": peak,
                }
            )
    return {"ok": all(r["status"] != "OOM" or r["impl"] == "pml" for r in rows), "rows": rows}


def _retrieval_torch(e, y, k: int) -> dict[str, float]:
    """Exact P@1 and MAP@R, leave-one-out, blocked GEMM + topk on e's device (squared L2)."""
    import torch

    n = e.shape[0]
    sq = (e * e).sum(1)
    counts = torch.bincount(y)
    r = counts[y] - 1
    p1 = mapr = 0.0
    block = max(1, (1 << 28) // n)
    ranks = torch.arange(1, k + 1, device=e.device, dtype=torch.float64)
    for s in range(0, n, block):
        q = e[s : s + block]
        d = torch.addmm(sq[None, :], q, e.t(), alpha=-2.0)
        d[torch.arange(d.shape[0], device=e.device), torch.arange(s, s + d.shape[0])] = float("inf")
        idx = torch.topk(d, k, dim=1, largest=False, sorted=True).indices
        rel = (y[idx] == y[s : s + block, None]).double()
        rb = r[s : s + block].clamp(1, k).double()
        rel = rel * (ranks[None, :] <= rb[:, None])
        p1 += float(rel[:, 0].sum())
        mapr += float(((rel.cumsum(1) / ranks * rel).sum(1) / rb).sum())
    return {"precision_at_1": p1 / n, "map_at_r": mapr / n}


def step_retrieval(
    work: Path, device: str = "cuda", n: int = RETRIEVAL_N, classes: int = RETRIEVAL_CLASSES
) -> dict[str, Any]:
    """Exact P@1 / MAP@R of n clustered vectors on ``device`` (CPU only for the smoke test)."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    centres = torch.randn(classes, RETRIEVAL_D, generator=g)
    y = torch.arange(n) % classes
    e = centres[y] + 1.5 * torch.randn(n, RETRIEVAL_D, generator=g)
    e = torch.nn.functional.normalize(e, dim=1)
    k = n // classes - 1
    out: dict[str, Any] = {"n": n, "d": RETRIEVAL_D, "k": k}
    cuda = torch.device(device).type == "cuda"
    try:
        import faiss

        have_faiss_gpu = cuda and faiss.get_num_gpus() > 0
    except (ImportError, AttributeError):
        have_faiss_gpu = False
    t = time.perf_counter()
    if have_faiss_gpu:
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(res, RETRIEVAL_D)
        x = e.numpy()
        index.add(x)
        _, idx = index.search(x, min(k + 1, 2048))
        idx = torch.from_numpy(idx[:, 1:])
        out["engine"] = "faiss-gpu GpuIndexFlatL2"
        out["precision_at_1"] = float((y[idx[:, 0]] == y).double().mean())
    else:
        out["engine"] = f"torch on {device} (blocked GEMM + topk)"
        out.update(_retrieval_torch(e.to(device), y.to(device), k))
    _sync(device)
    out["time_s"] = time.perf_counter() - t
    if cuda:
        out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    # the GPU path against the library on a subset (same definitions, CPU)
    from tripletlab.metrics import retrieval_metrics

    sub = torch.arange(min(n, 20_000))
    lib = retrieval_metrics(e[sub], y[sub], ks=(1,), distance="euclidean", nmi=False)
    k_sub = int(torch.bincount(y[sub]).max()) - 1
    gpu = _retrieval_torch(e[sub].to(device), y[sub].to(device), k_sub)
    out["subset_check"] = {"library": lib["map_at_r"], "gpu": gpu["map_at_r"]}
    ok = abs(lib["map_at_r"] - gpu["map_at_r"]) < 1e-3
    return {"ok": ok, **out}


def _train(work: Path, data: Path, amp: bool) -> dict[str, Any]:
    run = work / ("run-amp" if amp else "run-fp32")
    cmd = [
        sys.executable,
        "-m",
        "tripletlab",
        "train",
        "--data",
        str(data),
        "--backbone",
        "mobilenet_v2",
        "--steps",
        str(TRAIN_STEPS),
        "--device",
        "cuda",
        "--out",
        str(run),
    ] + (["--amp"] if amp else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        return {"ok": False, "exit": proc.returncode, "error": proc.stderr.strip()[-400:]}
    ev = json.loads((run / "eval.json").read_text())
    losses = [
        json.loads(line).get("loss")
        for line in (run / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    losses = [v for v in losses if isinstance(v, (int, float))]
    import math

    return {
        "ok": bool(losses) and all(math.isfinite(v) for v in losses),
        "wall_s": wall,
        "train_samples_per_s": ev.get("train_samples_per_s"),
        "final_loss": losses[-1] if losses else None,
        "test_map_at_r": ev.get("retrieval", {}).get("map_at_r"),
        "run": str(run),
    }


def step_train(work: Path) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from make_jpeg_folder import make_folder

    data = work / "jpegs"
    if not data.exists():
        make_folder(data, 2000, 100)
    amp, fp32 = _train(work, data, True), _train(work, data, False)
    out = {"ok": amp.get("ok", False) and fp32.get("ok", False), "amp": amp, "fp32": fp32}
    if out["ok"] and amp.get("train_samples_per_s") and fp32.get("train_samples_per_s"):
        out["amp_speedup"] = amp["train_samples_per_s"] / fp32["train_samples_per_s"]
        out["map_at_r_difference"] = abs((amp["test_map_at_r"] or 0) - (fp32["test_map_at_r"] or 0))
    return out


def step_export(work: Path) -> dict[str, Any]:
    run = work / "run-fp32"
    if not (run / "config.json").exists():
        return {"ok": False, "error": "no trained run (the train step did not finish)"}
    onnx_file = work / "model.onnx"
    cmd = [sys.executable, "-m", "tripletlab", "export", "--model", str(run), "--out"]
    cmd += [str(onnx_file), "--check-data", str(work / "jpegs"), "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out: dict[str, Any] = {"export_exit": proc.returncode, "export": proc.stdout.strip()[-600:]}
    try:
        import numpy as np
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["providers"] = providers
        if "CUDAExecutionProvider" in providers and onnx_file.exists():
            sess = ort.InferenceSession(str(onnx_file), providers=["CUDAExecutionProvider"])
            inp = sess.get_inputs()[0]
            shape = [1 if not isinstance(v, int) else v for v in inp.shape]
            x = np.random.default_rng(0).random(shape, dtype=np.float32)
            cpu = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
            a, b = sess.run(None, {inp.name: x})[0], cpu.run(None, {inp.name: x})[0]
            out["cuda_vs_cpu_max_abs"] = float(np.abs(a - b).max())
        else:
            out["cuda_provider"] = "absent (onnxruntime-gpu not installed): not checked"
    except ImportError:
        out["onnxruntime"] = "not installed"
    return {"ok": proc.returncode == 0, **out}


STEP_FUNCS = {
    "tests": step_tests,
    "mining": step_mining,
    "retrieval": step_retrieval,
    "train": step_train,
    "export": step_export,
}


# ------------------------------------------------------------------------------------ driver


def run_all(out_file: Path, budget_s: float, work: Path) -> int:
    problem = _cuda_problem()
    if problem:
        print(f"GPU CHECK FAILED: {problem}", file=sys.stderr)
        return 1
    t0 = time.monotonic()
    results: dict[str, Any] = {"budget_s": budget_s, "steps": {}}
    for st in plan(budget_s):
        left = budget_s - (time.monotonic() - t0)
        limit = max(5.0, min(st["limit_s"], left))
        t = time.monotonic()
        cmd = st["cmd"] + ["--work", str(work)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT)
            lines = proc.stdout.strip().splitlines()
            res = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
            if res is None:
                res = {"ok": False, "exit": proc.returncode, "error": proc.stderr[-600:]}
        except subprocess.TimeoutExpired:
            res = {"ok": False, "error": f"ran past its limit of {limit:.0f} s"}
        res["seconds"] = round(time.monotonic() - t, 1)
        results["steps"][st["step"]] = res
        print(f"{st['step']:<10} {'ok' if res.get('ok') else 'FAILED':<7} {res['seconds']} s")
        out_file.write_text(json.dumps(results, indent=2, default=str))
    results["total_s"] = round(time.monotonic() - t0, 1)
    out_file.write_text(json.dumps(results, indent=2, default=str))
    failed = [k for k, v in results["steps"].items() if not v.get("ok")]
    print(f"results: {out_file}; {'all ok' if not failed else 'FAILED: ' + ', '.join(failed)}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check.json", help="the results file (JSON)")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for all steps (480)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.add_argument("--step", choices=sorted(STEP_FUNCS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 30 <= args.budget <= 480:
        p.error("--budget must be between 30 and 480 seconds (the check fits 8 minutes)")
    if args.step:
        work = Path(args.work or tempfile.mkdtemp(prefix="gpu-check-"))
        problem = _cuda_problem()
        res = {"ok": False, "error": problem} if problem else STEP_FUNCS[args.step](work)
        print(json.dumps(res, default=str))
        return 0
    if args.dry_run:
        problem = _cuda_problem()
        print(f"gpu check plan: budget {args.budget:.0f} s, results to {args.out}")
        for st in plan(args.budget):
            print(f"  {st['step']:<10} <= {st['limit_s']:>3} s  {st['what']}")
        print(f"CUDA here: {'no (' + problem + ')' if problem else 'yes'}; nothing was run")
        return 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        return run_all(Path(args.out), args.budget, Path(args.work or tmp))


if __name__ == "__main__":
    sys.exit(main())
