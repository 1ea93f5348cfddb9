"""Training on explicit (anchor, positive, negative) text triplets: the :data:`TRIPLET_FILE` task.

A triplet file (:func:`tripletlab.data.text.load_text_triplets`) has no labels, so there is
nothing to mine: each batch holds ``p * k`` rows of the file (:class:`TripletRowBatches`) and the
loss is the explicit triplet loss ``max(0, d(a, p) - d(a, n) + margin)`` (or its soft-margin
form) of exactly those triplets, through :class:`tripletlab.TripletLoss` with an
``indices_tuple`` (:class:`ExplicitTripletLoss`; so the statistics — active fraction, mean
d(a,p) / d(a,n) — are the same as for mined batches). The rows are split by a seeded permutation
(``test_fraction``, then ``val_fraction`` of the rest); validation and test report the
**triplet accuracy** (:class:`TripletAccuracyEvaluator`), the share of held-out triplets with
``d(a,p) < d(a,n)``, and the best validation accuracy picks the saved model. These plug into
the same :class:`tripletlab.train.Trainer` loop as labelled data; checkpoints, resume, logging
and the run directory are the trainer's. :class:`TripletFileTrainer` is that trainer with this
task.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..data.text import TextTriplets, load_text_triplets
from ..distances import rowwise_distance
from ..errors import InputError
from ..inference.embed import embed
from ..losses.triplet import TripletLoss
from ..metrics.evaluate import EvalResult, eval_distance
from ..rundir.files import load_run, read_json
from ..utils import atomic_write_json
from .batches import Batch, SamplerBatches
from .build import (
    Context,
    Defaults,
    Parts,
    Splits,
    Task,
    build_text_model,
    lr_factor,
    resolve_defaults,
)
from .config import TrainConfig
from .trainer import Trainer

__all__ = [
    "TRIPLET_FILE",
    "ExplicitTripletLoss",
    "TripletAccuracyEvaluator",
    "TripletBatches",
    "TripletFileTrainer",
    "TripletRowBatches",
    "triplet_accuracy",
]


class TripletBatches:
    """Seeded shuffled batches of row indices, epoch after epoch; resumable mid-epoch.

    Example:
        >>> b = TripletBatches(5, batch=2, seed=0)
        >>> sorted(i for batch in b for i in batch)
        [0, 1, 2, 3, 4]
    """

    def __init__(self, n: int, batch: int, seed: int = 0) -> None:
        if n < 1 or batch < 1:
            raise InputError(f"need at least one triplet and batch >= 1 (got {n}, {batch})")
        self.n, self.batch, self.seed = int(n), int(batch), int(seed)
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch)

    def __iter__(self):
        while self.position < len(self):
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            s = self.position * self.batch
            self.position += 1
            yield order[s : s + self.batch].tolist()
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "n": self.n,
            "batch": self.batch,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = (self.n, self.batch, self.seed)
        theirs = (state.get("n"), state.get("batch"), state.get("seed"))
        if mine != theirs:
            raise InputError(f"sampler state for (n, batch, seed) {theirs}, not {mine}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def triplet_accuracy(
    model: torch.nn.Module,
    triplets: TextTriplets,
    distance: str,
    batch_size: int = 256,
    device: str = "cpu",
) -> dict:
    """Share of triplets with ``d(a, p) < d(a, n)`` (ties count half), and the mean distances.

    Example:
        >>> triplet_accuracy(model, TextTriplets(["a"], ["b"], ["c"]), "cosine")  # doctest: +SKIP
        {'triplet_accuracy': 1.0, 'mean_d_ap': 0.2, 'mean_d_an': 0.9, 'n_triplets': 1}
    """
    a = embed(model, triplets.anchors, batch_size, device).double()
    p = embed(model, triplets.positives, batch_size, device).double()
    n = embed(model, triplets.negatives, batch_size, device).double()
    d_ap, d_an = rowwise_distance(a, p, distance), rowwise_distance(a, n, distance)
    acc = ((d_ap < d_an).double() + 0.5 * (d_ap == d_an).double()).mean()
    return {
        "triplet_accuracy": float(acc),
        "mean_d_ap": float(d_ap.mean()),
        "mean_d_an": float(d_an.mean()),
        "n_triplets": len(triplets),
    }


def _split_rows(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    if n < 2 or fraction <= 0:
        return list(range(n)), []
    n_out = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(perm[n_out:].tolist()), sorted(perm[:n_out].tolist())


class TripletRowBatches(SamplerBatches):
    """Training batches of triplet rows: ``x`` the anchors, then the positives, then the
    negatives of the rows (texts); ``y`` labels that make exactly those triplets valid (a_i and
    p_i share label i, n_i has its own label b + i)."""

    def __init__(self, rows: TripletBatches, triplets: TextTriplets, device: torch.device):
        self.sampler, self.triplets, self.device = rows, triplets, device

    def __iter__(self):
        for idx in self.sampler:
            batch = self.triplets.subset(idx)
            b = len(idx)
            r = torch.arange(b)
            y = torch.cat([r, r, b + r]).to(self.device)
            yield Batch(batch.anchors + batch.positives + batch.negatives, y, b)


class ExplicitTripletLoss(torch.nn.Module):
    """The triplet loss of the given triplets of a :class:`TripletRowBatches` batch (embeddings
    of anchors, positives, negatives in thirds); ``stats``: the loss's batch statistics."""

    def __init__(self, loss_fn: TripletLoss) -> None:
        super().__init__()
        self.loss_fn = loss_fn

    @property
    def stats(self) -> dict:
        return self.loss_fn.stats

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        b = len(labels) // 3
        r = torch.arange(b, device=emb.device)
        return self.loss_fn(emb, labels, indices_tuple=(r, b + r, 2 * b + r))


class TripletAccuracyEvaluator:
    """Triplet accuracy on held-out triplets (it picks the saved model)."""

    selection_metric = "triplet_accuracy"
    val_metrics = ("triplet_accuracy", "mean_d_ap", "mean_d_an")

    def validate(self, trainer) -> dict | None:
        val = trainer.val_set
        if val is None or len(val) == 0:
            return None
        distance = eval_distance(trainer.model_config)
        return triplet_accuracy(
            trainer.model, val, distance, trainer.cfg.eval_batch_size, trainer.device
        )

    def test(self, trainer, result: EvalResult) -> tuple[EvalResult, None]:
        """The best model (loaded from the run into the trainer's) on the test triplets."""
        model, _ = load_run(trainer.run_dir)
        trainer.model.load_state_dict(model.state_dict())
        dist = eval_distance(trainer.model_config)
        out = {"split": "test", "distance": dist, **result}
        best = trainer.state.best
        out["best_val_triplet_accuracy"] = best if best >= 0 else None
        if len(trainer.test_set):
            out.update(
                triplet_accuracy(
                    trainer.model,
                    trainer.test_set,
                    dist,
                    trainer.cfg.eval_batch_size,
                    trainer.device,
                )
            )
        return out, None


def prepare_triplet_splits(cfg: TrainConfig, ctx: Context) -> tuple[Splits, Defaults]:
    """Read the triplet file and split its rows (``split.json``; reused on resume)."""
    data = load_text_triplets(cfg.data, skip_bad=cfg.skip_bad)
    split_path = ctx.run_dir / "split.json"
    if ctx.resume and split_path.exists():
        info = read_json(split_path, "split")
    else:
        train_rows, test_rows = _split_rows(len(data), cfg.test_fraction, cfg.seed)
        fit_rows, val_rows = (train_rows, [])
        if cfg.val_fraction > 0 and cfg.evaluate:
            keep, held = _split_rows(len(train_rows), cfg.val_fraction, cfg.seed + 1)
            fit_rows, val_rows = [train_rows[i] for i in keep], [train_rows[i] for i in held]
        info = {
            "by": "triplets",
            "n_items": len(data),
            "train": fit_rows,
            "val": val_rows,
            "test": test_rows,
        }
        atomic_write_json(split_path, info)
    if info.get("by") != "triplets" or info.get("n_items") != len(data):
        raise InputError(f"{split_path} was written for other data")
    train = data.subset(info["train"])
    val = data.subset(info["val"]) if info["val"] else None
    splits = Splits(data, train, val, data.subset(info["test"]), train, info)
    return splits, resolve_defaults(cfg, "triplets", custom_data=False)


def build_triplet_parts(
    cfg: TrainConfig, splits: Splits, defaults: Defaults, ctx: Context
) -> Parts:
    """A pretrained text encoder, the explicit triplet loss, seeded row batches, AdamW."""
    if ctx.dist is not None:
        raise InputError(
            "--distributed is not supported for (anchor, positive, negative) triplet files "
            "yet: train them in one process"
        )
    torch.manual_seed(cfg.seed)
    model = build_text_model(cfg, ctx.run_dir, splits.dataset, ctx.log).to(ctx.device)
    loss_fn = TripletLoss(
        margin=cfg.margin,
        strategy="all",  # every given triplet; ignored with an indices_tuple
        distance=cfg.distance,
        soft_margin=cfg.soft_margin,
        reduction="mean",
        seed=cfg.seed + 3,
    )
    rows = TripletBatches(len(splits.train), cfg.p * cfg.k, seed=cfg.seed)
    total_steps = cfg.steps or defaults.epochs * len(rows)
    eval_every = cfg.eval_every or len(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=defaults.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps)
    )
    return Parts(
        model=model,
        model_config=model.config,
        loss_fn=loss_fn,
        criterion=ExplicitTripletLoss(loss_fn),
        sampler=rows,
        batches=TripletRowBatches(rows, splits.train, ctx.device),
        optimizer=opt,
        scheduler=sched,
        forward=model,
        total_steps=total_steps,
        eval_every=eval_every,
        checkpoint_every=cfg.checkpoint_every or eval_every,
    )


#: explicit (anchor, positive, negative) text triplets: row batches, triplet accuracy
TRIPLET_FILE = Task(
    prepare_triplet_splits, build_triplet_parts, TripletAccuracyEvaluator, autocast=False
)


class TripletFileTrainer(Trainer):
    """:class:`~tripletlab.train.Trainer` with the :data:`TRIPLET_FILE` task.

    Example:
        >>> cfg = resolve_config(overrides={"data": "triplets.jsonl", "steps": 100})
        ... # doctest: +SKIP
        >>> TripletFileTrainer(cfg).fit()["triplet_accuracy"]  # doctest: +SKIP
    """

    def __init__(self, cfg: TrainConfig | None = None, resume: bool = False, log=print, **kw):
        super().__init__(cfg, resume, log, task=TRIPLET_FILE, **kw)
