"""Benchmark: forward + backward time and peak memory of triplet mining + loss, against
pytorch-metric-learning (pml), a dense TF-Addons-style semi-hard reference and the GEMM floor.

Inputs (identical for every implementation): ``B`` samples, ``K`` per class (``B / K`` classes,
shuffled), ``x ~ N(0, 1)`` of shape (B, D) and embeddings ``e = normalize(Linear(D, D)(x))``, so the
backward pass is real (it reaches the linear layer's weights). One *step* is
``zero_grad; e = normalize(lin(x)); loss = f(e, y); loss.backward()``.

Implementations per strategy (``margin = 0.2``, euclidean distance everywhere):

* ``all`` — tripletlab ``TripletLoss(strategy="all", reduction="mean_active")`` vs pml
  ``TripletMarginMiner(margin, "all") + TripletMarginLoss(margin)`` (pml's default reducer,
  ``AvgNonZeroReducer``, is the mean over active triplets: same value and gradient).
* ``semihard`` — tripletlab ``TripletLoss(strategy="semihard", semihard_fallback="easiest",
  reduction="mean")`` vs (a) pml ``TripletMarginMiner(margin, "semihard") + TripletMarginLoss``
  (pml's semi-hard keeps *every* triplet with ``d_ap < d_an <= d_ap + margin``: different
  semantics, timed only) and (b) :func:`dense_semihard_loss`, a straightforward dense torch version
  of TF-Addons' ``triplet_semihard_loss`` (same semantics as ours: value and gradient must agree).
* ``hard`` — tripletlab ``TripletLoss(strategy="hard", reduction="mean_active")`` vs pml
  ``BatchHardMiner + TripletMarginLoss`` (``AvgNonZeroReducer``; same value and gradient).
* floors — ``(e @ e.T).sum()`` (the raw GEMM) and ``pairwise_distance(e).sum()`` (tripletlab's
  euclidean distance matrix), forward + backward: no mining implementation can be faster.

pml always uses ``LpDistance(normalize_embeddings=False)`` (the inputs are already normalised).

Time: median of ``--repeats`` steps after one warm-up step. Memory: every configuration runs in its
own subprocess; its *extra peak memory* is the peak resident set size during the warm-up and timed
steps minus the resident set size just before the first step (after imports and input creation;
Linux ``/proc/self/clear_refs`` resets the peak, otherwise ``ru_maxrss`` is used). A configuration
whose estimated memory exceeds ``--mem-cap-gib`` (or the memory available) is skipped *before*
running; the subprocess also gets an address-space limit, so one that outgrows the cap anyway, fails
or times out is reported as such in the table instead of crashing the benchmark.

Value agreement: where the semantics are the same, the loss and a fingerprint of the weight
gradient (its norm and projections onto fixed random directions) must agree to 1e-4 (relative);
a disagreement makes the exit code 1.

Usage::

    tripletlab bench                       # full table: B in {256, 1024, 4096, 8192}
    tripletlab bench --quick               # B in {64, 256}, 2 repeats
    tripletlab bench --sizes 1024 --strategies all --json out.json
    python benchmarks/bench_mining.py ...  # the same

This file lives beside the other benchmarks, outside the installed package (it carries a
reference implementation and peer comparisons that users of the library do not need);
``tripletlab bench`` finds it in a source checkout (see :mod:`tripletlab.cli.bench`). Needs the
``bench`` extra (``pip install -e .[bench]``) for the pytorch-metric-learning columns; without it
those are marked as skipped.

From Python (with ``benchmarks/`` on ``sys.path``):
``from bench_mining import run_benchmark; run_benchmark(["--quick"])``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

__all__ = ["dense_semihard_loss", "estimate_gib", "run_benchmark"]

STRATEGIES = ("all", "semihard", "hard")
FLOORS = ("floor-gemm", "floor-dist")

# implementation -> short description (docs, --help)
IMPLS = {
    "tripletlab": "tripletlab TripletLoss",
    "pml": "pytorch-metric-learning miner + TripletMarginLoss (LpDistance, no renormalisation)",
    "dense-tfa": "dense torch TF-Addons triplet_semihard_loss (O(K*B^2) memory)",
    "floor-gemm": "floor: (e @ e.T).sum() forward + backward",
    "floor-dist": "floor: tripletlab pairwise_distance(e).sum() forward + backward",
}

# tripletlab's reduction per strategy, matching the peer it is compared with
TL_REDUCTION = {"all": "mean_active", "semihard": "mean", "hard": "mean_active"}
# peers with the same semantics as tripletlab (value and gradient must agree)
SAME_SEMANTICS = {("all", "pml"), ("hard", "pml"), ("semihard", "dense-tfa")}

_INT32_MAX = 2**31 - 1
_GIB = 2**30
_AGREE_RTOL = 1e-4


# --------------------------------------------------------------------------------------------
# inputs, the dense reference and the steps being timed
# --------------------------------------------------------------------------------------------


def make_inputs(b: int, d: int = 128, k: int = 4, seed: int = 0):
    """Fixed random inputs ``(x, labels, linear)``: B rows, K per class, shuffled."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, d, generator=g)
    labels = torch.arange((b + k - 1) // k).repeat_interleave(k)[:b]
    perm = torch.randperm(b, generator=g)
    lin = torch.nn.Linear(d, d)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d, d, generator=g) / d**0.5)
        lin.bias.copy_(0.1 * torch.randn(d, generator=g))
    return x[perm].contiguous(), labels[perm].contiguous(), lin


def dense_semihard_loss(embeddings, labels, margin: float = 0.2, distance: str = "euclidean"):
    """TF-Addons' ``triplet_semihard_loss`` (FaceNet semi-hard), computed densely in plain torch.

    For every positive pair (a, p): the negative is the closest one with ``d(a, n) > d(a, p)``, or,
    if none exists, the farthest negative of ``a``; the loss is the mean over positive pairs of
    ``max(0, d(a, p) - d(a, n) + margin)``. A reference for ``TripletLoss(strategy="semihard",
    semihard_fallback="easiest", reduction="mean")`` that shares only the distance matrix with it
    (``pairwise_distance``; the mining and the reduction are written out densely, no sorting, no
    chunks). Sharing the matrix matters for the comparison: two float32 distance matrices computed
    in a different order differ by ~1e-7, enough to flip near-tied ``d(a, n) > d(a, p)`` decisions
    at B >= 4096 (same loss to 1e-6, a few pairs with another negative). Memory O(P * B) for P
    positive pairs, i.e. O(K * B^2) for PK batches (TF-Addons itself tiles a (B^2, B) matrix).
    """
    import torch

    from tripletlab.distances import pairwise_distance

    d = pairwise_distance(embeddings, distance=distance)
    same = labels[:, None] == labels[None, :]
    neg = ~same
    pos = same & ~torch.eye(d.shape[0], dtype=torch.bool)
    pos &= neg.any(dim=1, keepdim=True)  # anchors without a negative have no triplet
    pa, pp = pos.nonzero(as_tuple=True)
    d_ap = d[pa, pp]
    d_an = d[pa]  # (P, B)
    outside = neg[pa] & (d_an > d_ap[:, None])
    inf = torch.tensor(float("inf"), dtype=d.dtype)
    closest_outside = torch.where(outside, d_an, inf).min(dim=1).values
    farthest = torch.where(neg, d, -inf).max(dim=1).values[pa]
    d_neg = torch.where(outside.any(dim=1), closest_outside, farthest)
    return torch.relu(d_ap - d_neg + margin).sum() / max(pa.numel(), 1)


def _make_loss_fn(impl: str, strategy: str, margin: float):
    """The function ``f(embeddings, labels) -> scalar loss`` that one step times."""
    from tripletlab import TripletLoss
    from tripletlab.distances import pairwise_distance

    if impl == "tripletlab":
        fn = TripletLoss(
            margin=margin,
            strategy=strategy,
            reduction=TL_REDUCTION[strategy],
            semihard_fallback="easiest",
        )
        return fn
    if impl == "floor-gemm":
        return lambda e, y: (e @ e.t()).sum()
    if impl == "floor-dist":
        return lambda e, y: pairwise_distance(e).sum()
    if impl == "dense-tfa":
        return lambda e, y: dense_semihard_loss(e, y, margin)
    if impl == "pml":
        from pytorch_metric_learning import distances, losses, miners

        dist = distances.LpDistance(normalize_embeddings=False)
        loss = losses.TripletMarginLoss(margin=margin, distance=dist)
        if strategy == "hard":
            miner = miners.BatchHardMiner(distance=dist)
        else:
            miner = miners.TripletMarginMiner(
                margin=margin, type_of_triplets=strategy, distance=dist
            )
        return lambda e, y: loss(e, y, miner(e, y))
    raise ValueError(f"unknown implementation {impl!r}")


# --------------------------------------------------------------------------------------------
# memory: estimates (to skip before running) and measurement
# --------------------------------------------------------------------------------------------


def estimate_gib(impl: str, strategy: str, b: int, k: int = 4) -> float:
    """Rough upper estimate of a configuration's extra peak memory in GiB (to skip it early).

    pml's ``all``/``semihard`` miners enumerate every valid triplet, T = B (K-1) (B-K): below
    B^3 = 2^31 as a (B, B, B) uint8 mask + ``nonzero`` (24 bytes per triplet), above it in a loop
    over anchors (index tensors concatenated, gathered distances, masks: ~100 bytes per triplet).
    The dense reference holds a few (P, B) tensors, P = B (K-1) positive pairs. Everything else is
    a few (B, B) float matrices.
    """
    n_triplets = b * max(k - 1, 0) * max(b - k, 0)
    if impl == "pml" and strategy in ("all", "semihard"):
        if b**3 < _INT32_MAX:
            return (b**3 + 80 * n_triplets) / _GIB
        return 100 * n_triplets / _GIB
    if impl == "dense-tfa":
        return 16 * b * max(k - 1, 1) * b / _GIB + 8 * 4 * b * b / _GIB
    return 8 * 4 * b * b / _GIB


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / _GIB
    except OSError:
        return None
    return None


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> tuple[str, int]:
    """Start a peak-memory measurement: returns (method, baseline KiB)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        rss = _proc_status_kib("VmRSS")
        if rss is not None and _proc_status_kib("VmHWM") is not None:
            return "VmHWM", rss
    except OSError:
        pass
    return "ru_maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_kib(method: str) -> int:
    if method == "VmHWM":
        return _proc_status_kib("VmHWM") or 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _limit_address_space(cap_gib: float) -> None:
    """Let allocations beyond (current virtual size + cap) fail with an out-of-memory error."""
    vm = _proc_status_kib("VmSize")
    if vm is None or cap_gib <= 0:
        return
    limit = vm * 1024 + int(cap_gib * _GIB)
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        pass


# --------------------------------------------------------------------------------------------
# one configuration
# --------------------------------------------------------------------------------------------


def _grad_fingerprint(grad) -> list[float]:
    """Norm of a gradient and its projections onto 3 fixed random directions."""
    import torch

    g = torch.Generator().manual_seed(1234)
    flat = grad.detach().double().flatten()
    dirs = torch.randn(3, flat.numel(), generator=g, dtype=torch.float64)
    return [float(flat.norm())] + [float(v) for v in dirs @ flat]


def measure(spec: dict[str, Any], *, measure_memory: bool = True) -> dict[str, Any]:
    """Run one configuration in this process: warm-up + ``repeats`` timed steps.

    Returns ``time_s`` (median), ``times``, ``loss``, ``grad`` (fingerprint) and, with
    ``measure_memory``, ``extra_mib`` (peak RSS during the steps minus RSS before them).
    """
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    x, y, lin = make_inputs(spec["b"], spec["d"], spec["k"])
    loss_fn = _make_loss_fn(spec["impl"], spec["strategy"], spec["margin"])

    def step() -> float:
        lin.zero_grad(set_to_none=True)
        e = torch.nn.functional.normalize(lin(x), dim=1)
        loss = loss_fn(e, y)
        loss.backward()
        return float(loss.detach())

    if measure_memory:
        if spec.get("mem_cap_gib"):
            _limit_address_space(float(spec["mem_cap_gib"]))
        method, base = _reset_peak()
    value = step()  # warm-up (its peak counts: it is the same work)
    grad = _grad_fingerprint(lin.weight.grad)
    times = []
    for _ in range(int(spec["repeats"])):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    out: dict[str, Any] = {
        "time_s": statistics.median(times),
        "times": times,
        "loss": value,
        "grad": grad,
        "threads": torch.get_num_threads(),
    }
    if measure_memory:
        out["extra_mib"] = max(_peak_kib(method) - base, 0) / 1024.0
        out["memory_method"] = method
    return out


def _skip_reason(spec: dict[str, Any]) -> str | None:
    est = estimate_gib(spec["impl"], spec["strategy"], spec["b"], spec["k"])
    cap = float(spec["mem_cap_gib"])
    if est > cap:
        return f"skipped: would need ~{est:.0f} GiB (cap {cap:g} GiB)"
    avail = _available_gib()
    if spec.get("subprocess", True) and avail is not None and est > 0.8 * avail:
        return f"skipped: would need ~{est:.1f} GiB, {avail:.1f} GiB available"
    if spec["impl"] == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "skipped: pytorch-metric-learning not installed (pip install tripletlab[bench])"
    return None


def _run_one(spec: dict[str, Any], timeout: float, in_process: bool) -> dict[str, Any]:
    reason = _skip_reason({**spec, "subprocess": not in_process})
    if reason:
        return {"status": reason}
    if in_process:
        try:
            return {**measure(spec, measure_memory=False), "status": "ok"}
        except (RuntimeError, MemoryError) as exc:
            return {"status": f"failed: {type(exc).__name__}: {str(exc)[:80]}"}
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout: > {timeout:.0f} s"}
    if proc.returncode != 0:
        err = proc.stderr or ""
        last = (err.strip().splitlines() or ["?"])[-1][:80]
        if proc.returncode < 0 or "MemoryError" in err or "can't allocate memory" in err:
            return {"status": f"exceeds memory cap ({spec['mem_cap_gib']:g} GiB): {last}"}
        return {"status": f"failed (exit {proc.returncode}): {last}"}
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"status": "failed: the worker printed no result"}
    return {**res, "status": "ok"}


# --------------------------------------------------------------------------------------------
# the plan, comparisons and the table
# --------------------------------------------------------------------------------------------


def _plan(strategies, sizes) -> list[tuple[str, str, int]]:
    """(strategy, implementation, B), grouped by B so each ratio's parts run close in time."""
    out = []
    for b in sizes:
        out += [("floor", f, b) for f in FLOORS]
        for s in strategies:
            out.append((s, "tripletlab", b))
            out.append((s, "pml", b))
            if s == "semihard":
                out.append((s, "dense-tfa", b))
    return out


def _close(a: float, b: float, rtol: float = _AGREE_RTOL, scale: float = 1.0) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), scale)


def _agreement(tl: dict[str, Any], peer: dict[str, Any]) -> str:
    if not _close(peer["loss"], tl["loss"]):
        return f"LOSS DIFFERS ({peer['loss']:.6g} vs {tl['loss']:.6g})"
    gscale = max(tl["grad"][0], 1e-12)  # projections compared relative to the gradient norm
    if not all(_close(p, t, scale=gscale) for p, t in zip(peer["grad"], tl["grad"], strict=True)):
        return "GRADIENT DIFFERS"
    return "loss+grad agree"


def compare(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Build the table rows: one per (strategy, B, peer) plus one per (floor, B)."""
    by = {(r["strategy"], r["impl"], r["b"]): r for r in rows}
    sizes = sorted({r["b"] for r in rows})
    strategies = [s for s in STRATEGIES if any(r["strategy"] == s for r in rows)]
    table = []
    for b in sizes:
        floors = {f: by.get(("floor", f, b), {}) for f in FLOORS}
        for f in FLOORS:
            if f in floors and floors[f]:
                fr = floors[f]
                table.append(
                    {
                        "strategy": f,
                        "b": b,
                        "tl_time_s": fr.get("time_s"),
                        "tl_extra_mib": fr.get("extra_mib"),
                        "tl_status": fr["status"],
                    }
                )
        for s in strategies:
            tl = by.get((s, "tripletlab", b), {"status": "not run"})
            tl_ok = tl.get("status") == "ok"
            for peer_name in ("pml", "dense-tfa"):
                peer = by.get((s, peer_name, b))
                if peer is None:
                    continue
                row: dict[str, Any] = {
                    "strategy": s,
                    "b": b,
                    "tl_time_s": tl.get("time_s"),
                    "tl_extra_mib": tl.get("extra_mib"),
                    "tl_loss": tl.get("loss"),
                    "tl_status": tl["status"],
                    "peer": peer_name,
                    "peer_time_s": peer.get("time_s"),
                    "peer_extra_mib": peer.get("extra_mib"),
                    "peer_loss": peer.get("loss"),
                    "peer_status": peer["status"],
                }
                if tl_ok:
                    for key, fl in (("vs_gemm", "floor-gemm"), ("vs_dist", "floor-dist")):
                        if floors[fl].get("status") == "ok":
                            row[key] = tl["time_s"] / floors[fl]["time_s"]
                if tl_ok and peer["status"] == "ok":
                    row["speedup"] = peer["time_s"] / tl["time_s"]
                    if tl.get("extra_mib") is not None and peer.get("extra_mib"):
                        row["mem_fraction"] = tl["extra_mib"] / peer["extra_mib"]
                    if (s, peer_name) in SAME_SEMANTICS:
                        row["check"] = _agreement(tl, peer)
                    else:
                        row["check"] = "n/a: different semantics"
                table.append(row)
    return table


def _fmt(v: Any, spec: str, width: int) -> str:
    return format(v, spec).rjust(width) if isinstance(v, (int, float)) else "-".rjust(width)


def format_table(table: list[dict[str, Any]]) -> str:
    """The result table as fixed-width text (also valid inside a Markdown code block)."""
    head = (
        f"{'strategy':<10} {'B':>5} {'tl s':>8} {'tl MiB':>7}  {'peer':<9} {'peer s':>8} "
        f"{'peer MiB':>8} {'speedup':>8} {'mem frac':>8} {'tl/GEMM':>7} {'tl/dist':>7}  check"
    )
    lines = [head, "-" * len(head)]
    for r in table:
        notes = []
        if r.get("tl_status", "ok") != "ok":
            notes.append(f"tripletlab {r['tl_status']}")
        if r.get("peer") and r.get("peer_status") != "ok":
            notes.append(f"{r['peer']} {r['peer_status']}")
        if r.get("check"):
            notes.append(r["check"])
        lines.append(
            f"{r['strategy']:<10} {r['b']:>5} {_fmt(r.get('tl_time_s'), '.4f', 8)} "
            f"{_fmt(r.get('tl_extra_mib'), '.0f', 7)}  {r.get('peer') or '':<9} "
            f"{_fmt(r.get('peer_time_s'), '.4f', 8)} {_fmt(r.get('peer_extra_mib'), '.0f', 8)} "
            f"{_fmt(r.get('speedup'), '.1f', 7)}{'x' if r.get('speedup') else ' '} "
            f"{_fmt(r.get('mem_fraction'), '.3f', 8)} {_fmt(r.get('vs_gemm'), '.2f', 7)} "
            f"{_fmt(r.get('vs_dist'), '.2f', 7)}  " + "; ".join(notes)
        )
    return "\n".join([*lines, "", *COLUMN_NOTES])


#: what the columns of :func:`format_table` mean (printed under the table)
COLUMN_NOTES = (
    "tl s / peer s: median seconds of one loss forward + backward (tripletlab / the peer "
    "library); tl MiB / peer MiB: their extra peak memory",
    "speedup = peer s / tl s; mem frac = tl MiB / peer MiB (below 1: tripletlab needs less)",
    "tl/GEMM = tl s / the time of (e @ e.T).sum() forward + backward; tl/dist = tl s / the time "
    "of pairwise_distance(e).sum(): how far a loss is above the cost of its distance matrix",
)


# --------------------------------------------------------------------------------------------
# floor ratios: every strategy against the distance matrix alone, interleaved in one process
# --------------------------------------------------------------------------------------------

FLOOR_SIZES = (64, 128, 256, 1024, 4096)


def _all_strategies() -> tuple[str, ...]:
    from tripletlab.functional import STRATEGIES as ALL

    return tuple(ALL)


def floor_ratios(
    sizes=FLOOR_SIZES,
    strategies=None,
    *,
    repeats: int = 5,
    d: int = 128,
    k: int = 4,
    margin: float = 0.2,
    pml_up_to: int = 256,
    cpu_time: bool = False,
) -> list[dict[str, Any]]:
    """Median time of one step (fwd + bwd) of every strategy and of the distance floor
    (``pairwise_distance(e).sum().backward()``, the same distance code), measured **interleaved**
    in this process: each repetition times every function once, in a rotated order, so a load
    change hits all of them alike. pml (batch-all, semi-hard, batch-hard) joins for B <=
    ``pml_up_to``. Small batches run several calls per sample (>= ~20 ms) and a sample is the
    median of its calls, so one descheduled call does not move it. ``cpu_time``: the thread's
    CPU time instead of wall-clock (robust on a busy machine). Returns rows ``{b, impl,
    strategy, time_s, times, ratio, vs_pml}`` with ``ratio`` = time / floor time at the same B.
    """
    import torch

    from tripletlab import TripletLoss

    strategies = tuple(strategies or _all_strategies())
    try:
        import pytorch_metric_learning  # noqa: F401

        have_pml = True
    except ImportError:
        have_pml = False
    rows: list[dict[str, Any]] = []
    for b in sizes:
        x, y, lin = make_inputs(b, d, k)
        floor_fn = _make_loss_fn("floor-dist", "all", margin)
        fns: list[tuple[str, str, Any]] = [("floor-dist", "floor", floor_fn)]
        for s in strategies:
            red = "mean_active" if s in ("all", "hard") else "mean"
            fns.append(("tripletlab", s, TripletLoss(margin=margin, strategy=s, reduction=red)))
        if have_pml and b <= pml_up_to:
            for s in ("all", "semihard", "hard"):
                if s in strategies:
                    fns.append(("pml", s, _make_loss_fn("pml", s, margin)))

        clock = time.thread_time if cpu_time else time.perf_counter

        def step(fn, x=x, y=y, lin=lin, clock=clock) -> float:  # one step, as in measure()
            t = clock()
            lin.zero_grad(set_to_none=True)
            _backward(fn(torch.nn.functional.normalize(lin(x), dim=1), y))
            return clock() - t

        # small batches: several calls per sample so one sample is >= ~20 ms
        calls = max(1, int(0.02 / max(_probe(step, fns), 1e-6)))
        times: dict[int, list[float]] = {i: [] for i in range(len(fns))}
        for i in range(len(fns)):  # warm-up
            step(fns[i][2])
        for r in range(repeats):
            order = list(range(len(fns)))
            order = order[r % len(order) :] + order[: r % len(order)]
            for i in order:
                times[i].append(statistics.median(step(fns[i][2]) for _ in range(calls)))
        floor = statistics.median(times[0])
        meds = [statistics.median(times[i]) for i in range(len(fns))]
        pml_time = {s: meds[i] for i, (impl, s, _) in enumerate(fns) if impl == "pml"}
        for i, (impl, s, _) in enumerate(fns):
            rows.append(
                {
                    "b": b,
                    "impl": impl,
                    "strategy": s,
                    "time_s": meds[i],
                    "times": times[i],
                    "ratio": meds[i] / floor,
                    # tripletlab's time / pml's for the same strategy, same B, same run
                    "vs_pml": meds[i] / pml_time[s] if s in pml_time else None,
                    "calls_per_sample": calls,
                }
            )
        print(f"  floor ratios: B={b} done", file=sys.stderr)
    return rows


def _backward(out) -> None:
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()


def _probe(step, fns) -> float:
    return max(step(fn) for _, _, fn in fns)


def format_floor_table(rows: list[dict[str, Any]]) -> str:
    """The floor-ratio table: time per step (µs below 10 ms), time / distance floor, and for
    tripletlab's rows where pml ran (B <= 256) time / pml's time (< 1: tripletlab is faster)."""
    head = f"{'B':>5}  {'impl':<10} {'strategy':<17} {'time':>11} {'x floor':>8} {'x pml':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        t = r["time_s"]
        tt = f"{t * 1e6:8.0f} us" if t < 0.01 else f"{t:9.4f} s"
        vs = r.get("vs_pml")
        vp = f"{vs:5.2f}x" if vs is not None and r["impl"] == "tripletlab" else ""
        lines.append(
            f"{r['b']:>5}  {r['impl']:<10} {r['strategy']:<17} {tt:>11} {r['ratio']:>7.2f}x {vp:>6}"
        )
    return "\n".join(lines)


def _environment(threads: int | None) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
    }
    try:
        import pytorch_metric_learning

        env["pytorch_metric_learning"] = pytorch_metric_learning.__version__
    except ImportError:
        env["pytorch_metric_learning"] = None
    try:
        env["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    return env


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tripletlab bench",
        description="Time and peak memory of triplet mining + loss (forward + backward) against "
        "pytorch-metric-learning, a dense TF-Addons semi-hard reference and the GEMM floor; "
        "loss values and gradients are cross-checked where the semantics agree.",
        epilog="Columns: 'speedup' = peer time / tripletlab time; 'mem frac' = tripletlab extra "
        "peak memory / peer's; 'tl/GEMM', 'tl/dist' = tripletlab time / floor time.",
    )
    p.add_argument("--quick", action="store_true", help="B in {64, 256} and 2 repeats")
    p.add_argument(
        "--floor",
        action="store_true",
        help="only the floor-ratio table: every strategy's step time / the distance matrix's "
        "(fwd + bwd), interleaved in one process, and per call against pml at B <= 256 "
        "(default sizes 64 128 256 1024 4096)",
    )
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 1024, 4096, 8192], help="batch sizes B"
    )
    p.add_argument(
        "--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES, metavar="S"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed steps after a warm-up (5)")
    p.add_argument("--k", type=int, default=4, help="samples per class (4)")
    p.add_argument("--dim", type=int, default=128, help="embedding dimension D (128)")
    p.add_argument("--margin", type=float, default=0.2, help="triplet margin (0.2)")
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        default=8.0,
        help="skip configurations estimated to need more, and cap each one's address space (8)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per configuration (600)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: measure twice in one run, at torch's default count and "
        "at 1, one table each)",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="--floor: time with the thread's CPU time, not wall-clock (a busy machine's "
        "descheduling does not count; use with --threads 1)",
    )
    p.add_argument(
        "--no-pml", action="store_true", help="leave pytorch-metric-learning out (floors, dense)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run everything in this process: faster, no memory figures (for smoke tests)",
    )
    p.add_argument("--json", dest="json_out", default=None, metavar="FILE", help="save results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def thread_counts(requested: int | None) -> list[int]:
    """The torch thread counts one run measures: the requested one, or by default the
    machine's default count (what a user gets) and 1 (comparable across machines), in that
    order (one entry where they coincide)."""
    import torch

    if requested:
        return [int(requested)]
    default = torch.get_num_threads()
    return [default] if default == 1 else [default, 1]


def _run_floor_table(args, sizes, env, threads: int) -> tuple[list[dict[str, Any]], str]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    t0 = time.time()
    load0 = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "?"
    try:
        rows = floor_ratios(
            sizes,
            repeats=args.repeats,
            d=args.dim,
            k=args.k,
            margin=args.margin,
            cpu_time=args.cpu_time,
        )
    finally:
        torch.set_num_threads(before)
    after = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "?"
    title = (
        f"tripletlab bench --floor: D={args.dim}, K={args.k}, median of {args.repeats} "
        f"interleaved repetitions ({'thread CPU time' if args.cpu_time else 'wall-clock'}); "
        f"x floor = time / pairwise_distance fwd+bwd at the same B; "
        f"torch {env['torch']} ({threads} threads); {env['cpus']} CPUs, load "
        f"{load0} -> {after}; {time.time() - t0:.0f} s"
    )
    return rows, title + "\n" + format_floor_table(rows)


def _run_floor(args, sizes, env) -> int:
    results = []
    for threads in thread_counts(args.threads):
        rows, text = _run_floor_table(args, sizes, env, threads)
        print(text, flush=True)
        results.append({"threads": threads, "floor": rows})
    if args.json_out:
        from tripletlab.utils import atomic_write_json

        atomic_write_json(
            args.json_out,
            {
                "args": vars(args),
                "environment": env,
                "floor": results[0]["floor"],
                "by_threads": results,
            },
        )
    return 0


def _run_table(args, sizes, repeats, env, threads: int):
    """Every configuration at ``threads`` torch threads: ``(rows, table, printed text)``."""
    t0 = time.time()
    try:
        load0 = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load0 = ["?"]
    rows = []
    for strategy, impl, b in _plan(args.strategies, sizes):
        if impl == "pml" and args.no_pml:
            continue
        spec = {
            "impl": impl,
            "strategy": "all" if strategy == "floor" else strategy,
            "b": b,
            "d": args.dim,
            "k": args.k,
            "margin": args.margin,
            "repeats": repeats,
            "mem_cap_gib": args.mem_cap_gib,
            "threads": threads,
        }
        res = _run_one(spec, args.timeout, args.in_process)
        rows.append({"strategy": strategy, "impl": impl, "b": b, **res})
        took = f" {res['time_s']:.4f} s" if "time_s" in res else ""
        mem = f" +{res['extra_mib']:.0f} MiB" if res.get("extra_mib") is not None else ""
        print(
            f"  {strategy:<9} B={b:<5} {impl:<10} T={threads} {res['status']}{took}{mem}",
            file=sys.stderr,
        )
    table = compare(rows)
    try:
        load1 = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load1 = ["?"]
    lines = [
        f"tripletlab bench: D={args.dim}, K={args.k}, margin={args.margin}, median of {repeats} "
        f"steps (fwd+bwd) after a warm-up; torch {env['torch']} ({threads} threads), "
        f"pml {env['pytorch_metric_learning']}; {env['cpus']} CPUs, load "
        f"{load0[0]} -> {load1[0]}; "
        f"{time.time() - t0:.0f} s" + ("; in-process: no memory figures" if args.in_process else "")
    ]
    load = load0[0] if isinstance(load0[0], float) else 0.0
    if env["cpus"] and load > env["cpus"] - 0.5:
        lines.append(
            f"note: the machine was busy (load {load} on {env['cpus']} CPUs): timings are "
            "inflated and noisy; ratios within this run still compare like with like"
            + ("" if threads == 1 else "; prefer --threads 1 on a busy machine")
        )
    lines.append(format_table(table))
    return rows, table, "\n".join(lines)


def run_benchmark(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table(s); exit code 0, 1 if values disagree, 2 on bad usage.

    Without ``--threads`` it measures twice in one run, at the machine's default torch thread
    count and at 1 thread, and prints one table per count.

    Example:
        >>> from bench_mining import run_benchmark
        >>> run_benchmark(["--sizes", "32", "--repeats", "1", "--in-process"])  # doctest: +SKIP
        0
    """
    p = _parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as exc:  # argparse: 0 for --help, 2 for bad usage
        return int(exc.code or 0)
    args.sizes_given = any(a == "--sizes" or a.startswith("--sizes=") for a in (argv or []))
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return 0
    bad = [b for b in args.sizes if b < 2 * args.k] + ([args.k] if args.k < 2 else [])
    if bad or args.repeats < 1 or args.dim < 1 or (args.threads is not None and args.threads < 1):
        print(
            "tripletlab bench: error: need k >= 2, every size >= 2k, repeats >= 1, dim >= 1, "
            "threads >= 1",
            file=sys.stderr,
        )
        return 2
    sizes, repeats = ([64, 256], 2) if args.quick else (args.sizes, args.repeats)
    env = _environment(args.threads)
    if args.floor:
        return _run_floor(args, sizes if (args.quick or args.sizes_given) else FLOOR_SIZES, env)
    import torch

    results, before = [], torch.get_num_threads()
    try:
        for threads in thread_counts(args.threads):
            rows, table, text = _run_table(args, sizes, repeats, env, threads)
            print(text, flush=True)
            results.append({"threads": threads, "runs": rows, "table": table})
    finally:  # in-process runs set the count of this process
        torch.set_num_threads(before)
    if args.json_out:
        from tripletlab.utils import atomic_write_json

        atomic_write_json(
            args.json_out,
            {
                "args": vars(args),
                "environment": env,
                "runs": results[0]["runs"],
                "table": results[0]["table"],
                "by_threads": results,
            },
        )
    disagree = [r for res in results for r in res["table"] if "DIFFERS" in str(r.get("check", ""))]
    return 1 if disagree else 0


if __name__ == "__main__":
    sys.exit(run_benchmark(sys.argv[1:]))
