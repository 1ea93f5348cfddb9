"""Training on explicit (anchor, positive, negative) text triplets: :class:`TripletFileTrainer`.

A triplet file (:func:`tripletlab.data.text.load_text_triplets`) has no labels, so there is
nothing to mine: each batch holds ``p * k`` rows of the file and the loss is the explicit
triplet loss ``max(0, d(a, p) - d(a, n) + margin)`` (or its soft-margin form) of exactly those
triplets, through :class:`tripletlab.TripletLoss` with an ``indices_tuple`` (so the statistics —
active fraction, mean d(a,p) / d(a,n) — are the same as for mined batches). The rows are split
by a seeded permutation (``test_fraction``, then ``val_fraction`` of the rest); validation and
test report the **triplet accuracy**, the share of held-out triplets with ``d(a,p) < d(a,n)``,
and the best validation accuracy picks the saved model. Everything else — checkpoints, resume,
logging, the run directory — is :class:`tripletlab.train.Trainer`'s.
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
from ..rundir.files import load_run, read_json, write_run_config
from ..utils import atomic_write_json, jsonable
from .setup import _lr_factor, _Running
from .trainer import Trainer

__all__ = ["TripletBatches", "TripletFileTrainer", "triplet_accuracy"]


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


class TripletFileTrainer(Trainer):
    """:class:`~tripletlab.train.Trainer` for a file of (anchor, positive, negative) texts.

    Example:
        >>> cfg = resolve_config(overrides={"data": "triplets.jsonl", "steps": 100})
        ... # doctest: +SKIP
        >>> TripletFileTrainer(cfg).fit()["triplet_accuracy"]  # doctest: +SKIP
    """

    selection_metric = "triplet_accuracy"
    val_metrics = ("triplet_accuracy", "mean_d_ap", "mean_d_an")

    def _prepare_data(self) -> None:
        cfg = self.cfg
        data = load_text_triplets(cfg.data, skip_bad=cfg.skip_bad)
        self.dataset = data
        split_path = self.run_dir / "split.json"
        if self.resume and split_path.exists():
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
        self.train_set = data.subset(info["train"])
        self.val_set = data.subset(info["val"]) if info["val"] else None
        self.test_set = data.subset(info["test"])
        self.train_full = self.train_set
        self.test_info = info

    def _build(self) -> None:
        cfg = self.cfg
        if self.dist is not None:
            raise InputError(
                "--distributed is not supported for (anchor, positive, negative) triplet files "
                "yet: train them in one process"
            )
        torch.manual_seed(cfg.seed)
        self.model = self._build_text_model()
        self.augment = None
        self.loss_fn = TripletLoss(
            margin=cfg.margin,
            strategy="all",  # every given triplet; ignored with an indices_tuple
            distance=cfg.distance,
            soft_margin=cfg.soft_margin,
            reduction="mean",
            seed=cfg.seed + 3,
        )
        self.sampler = TripletBatches(len(self.train_set), cfg.p * cfg.k, seed=cfg.seed)
        self.total_steps = cfg.steps or self._epochs() * len(self.sampler)
        self.eval_every = cfg.eval_every or len(self.sampler)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        self.opt = torch.optim.AdamW(
            self.model.parameters(), lr=self._lr(), weight_decay=cfg.weight_decay
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total_steps)
        )
        self.forward = self.model
        self.state = _Running()
        self.model_config = self.model.config
        write_run_config(
            self.run_dir, cfg.to_dict(), self.model_config, self.dataset, self.splits()
        )
        if self.resume:
            self._restore()

    def _train_step(self, idx: list[int]) -> tuple[float, dict]:
        batch = self.train_set.subset(idx)
        b = len(idx)
        self.opt.zero_grad(set_to_none=True)
        emb = self.forward(batch.anchors + batch.positives + batch.negatives)
        if not bool(torch.isfinite(emb).all()):
            return self._nonfinite("embeddings")
        r = torch.arange(b, device=emb.device)
        # a_i and p_i share label i; n_i has its own label b + i: every given triplet is valid
        labels = torch.cat([r, r, b + r])
        loss = self.loss_fn(emb, labels, indices_tuple=(r, b + r, 2 * b + r))
        stats = self.loss_fn.stats
        if not bool(torch.isfinite(loss)):
            return self._nonfinite("loss")
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return float(loss.detach()), stats

    def validate(self) -> dict | None:
        if self.val_set is None or len(self.val_set) == 0:
            return None
        return triplet_accuracy(
            self.model,
            self.val_set,
            eval_distance(self.model_config),
            self.cfg.eval_batch_size,
            self.device,
        )

    def final_evaluation(self, result: EvalResult | float) -> EvalResult:
        if not isinstance(result, dict):
            result = self._training_result(float(result))
        model, _ = load_run(self.run_dir)
        self.model.load_state_dict(model.state_dict())
        dist = eval_distance(self.model_config)
        out = {"split": "test", "distance": dist, **result}
        best = self.state.best
        out["best_val_triplet_accuracy"] = best if best >= 0 else None
        if len(self.test_set):
            out.update(
                triplet_accuracy(
                    self.model, self.test_set, dist, self.cfg.eval_batch_size, self.device
                )
            )
        atomic_write_json(self.run_dir / "eval.json", jsonable(out))
        return out
