"""Loss + mining time alone (forward + backward): sentence-transformers' three batch triplet
losses against tripletlab's loss with the matching strategy, on MiniLM-sized embeddings
(D = 384, unit vectors, K = 4 texts per label), with value/gradient agreement in float64.

    python benchmarks/bench_text_losses.py [--sizes 64 256 1024] [--threads 1] [--repeat 7]

Prints a markdown table (median seconds of ``--repeat`` runs after one warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _pairs():
    try:  # 6.x layout
        from sentence_transformers.sentence_transformer import losses as L
    except ImportError:
        from sentence_transformers import losses as L

    from tripletlab.integrations.sentence_transformers import TripletLoss

    return [
        ("BatchAllTripletLoss", L.BatchAllTripletLoss, "all", {}),
        ("BatchHardTripletLoss", L.BatchHardTripletLoss, "hard", {}),
        ("BatchSemiHardTripletLoss", L.BatchSemiHardTripletLoss, "semihard", {}),
    ], TripletLoss


def _time(fn, emb: torch.Tensor, labels: torch.Tensor, repeat: int) -> float:
    times = []
    for i in range(repeat + 1):
        e = emb.detach().clone().requires_grad_()
        t = time.perf_counter()
        fn(e, labels).backward()
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--margin", type=float, default=5.0, help="their default is 5")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pairs, Ours = _pairs()
    print(f"D={args.dim}, K={args.k}, margin={args.margin}, euclidean, {args.threads} thread(s)")
    print("| B | loss | theirs (s) | tripletlab (s) | ratio | max abs diff value / grad (f64) |")
    print("|---|---|---|---|---|---|")
    for b in args.sizes:
        g = torch.Generator().manual_seed(b)
        emb = torch.nn.functional.normalize(torch.randn(b, args.dim, generator=g), dim=1)
        labels = torch.arange(b // args.k).repeat_interleave(args.k)
        for name, cls, strategy, kw in pairs:
            theirs = cls(model=None, margin=args.margin)
            ours = Ours(None, margin=args.margin, strategy=strategy, **kw)

            def t_fn(e, y, m=theirs):
                return m.compute_loss_from_embeddings([e], y)

            def o_fn(e, y, m=ours):
                return m.compute_loss_from_embeddings([e], y)

            tt = _time(t_fn, emb, labels, args.repeat)
            to = _time(o_fn, emb, labels, args.repeat)
            e64 = emb.double()
            a, c = e64.clone().requires_grad_(), e64.clone().requires_grad_()
            lt, lo = t_fn(a, labels), o_fn(c, labels)
            lt.backward()
            lo.backward()
            dv = abs(lt.item() - lo.item())
            dg = float((a.grad - c.grad).abs().max())
            print(
                f"| {b} | {name} vs {strategy} | {tt:.4f} | {to:.4f} | {tt / to:.1f}x "
                f"| {dv:.1e} / {dg:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
