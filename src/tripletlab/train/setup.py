"""Building a :class:`~tripletlab.train.Trainer`: data and splits, model, loss, sampler, optimiser
(the ``_prepare_data`` and ``_build`` steps of ``Trainer.__init__``).

A mixin of :class:`~tripletlab.train.Trainer`: methods only; the state lives on the trainer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..data import Dataset, apply_split, split_dataset, split_validation
from ..data.augment import AugmentSpec, default_augment
from ..errors import (
    InputError,
)
from ..losses.distributed import DistributedTripletLoss
from ..losses.memory import CrossBatchMemory
from ..losses.triplet import TripletLoss
from ..models import build_augment, build_model, default_model_config
from ..rundir.environment import environment
from ..rundir.files import (
    read_json,
    write_run_config,
)
from ..runtime.process_group import convert_sync_batchnorm_any
from ..samplers import DistributedPKSampler, HardClassSampler, PKSampler
from ..utils import atomic_write_json
from .custom import custom_model_config


def _lr_factor(step: int, warmup: int, total: int) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


#: largest cache of frozen feature maps (``--freeze-stages N``) a trainer keeps in memory
PREFIX_CACHE_BYTES = 2 << 30


def _read_augment(aug, streamed: bool):
    """The :class:`AugmentSpec` ``aug`` names (one vocabulary for in-memory and streamed
    images; None when streamed: the streamed default); raises :class:`InputError` for an
    unknown one."""
    if aug is None and streamed:
        aug = default_augment("image", streamed=True)
    return AugmentSpec.from_config(aug)


def _augment_flips(aug, streamed: bool) -> bool:
    """True when the augmentation ``aug`` mirrors images (its cached features then include
    the mirror images')."""
    if aug is not None and not isinstance(aug, (str, dict)):
        return bool(getattr(aug, "hflip", False))
    try:
        return bool(getattr(_read_augment(aug, streamed), "hflip", False))
    except InputError:
        return False


def _flips_only(aug, streamed: bool) -> bool:
    """True when the augmentation ``aug`` (a preset name, a dict or None) is at most
    horizontal flips: cached feature maps of images and their mirror images reproduce it.
    ``streamed``: the spec as streamed images read it (``imagerun.stream_augment``)."""
    if isinstance(aug, str) and aug == "none":
        return True
    if aug is not None and not isinstance(aug, (str, dict)):
        return False
    try:
        a = _read_augment(aug, streamed)
    except InputError:
        return False
    return a is None or a.flips_only


@dataclass
class _Running:
    step: int = 0
    best: float = -1.0
    best_step: int = -1
    evals_without_improvement: int = 0
    skipped_nonfinite: int = 0


class TrainerSetup:
    """Methods of :class:`~tripletlab.train.Trainer` (see the module docstring)."""

    def _prepare_data(self) -> None:
        from .image_data import open_data

        cfg = self.cfg
        if self._user_data is not None:
            ds, given_test = self._user_data
        else:
            ds, self.files, self.choices = open_data(cfg, resume=self.resume)
            for line in self.choices:
                self.log(f"auto: {line}")
            given_test = None
        self.dataset = ds
        split_path = self.run_dir / "split.json"
        if self.resume and split_path.exists():
            info = read_json(split_path, "split")
            test_info = info["test"]
            train, test = (ds, given_test) if given_test is not None else apply_split(ds, test_info)
            self.train_full = train
            val_info = info.get("val")
            train, val = apply_split(train, val_info) if val_info else (train, None)
        else:
            by = cfg.split_by or (
                "predefined"
                if ds.predefined_split
                else "sample"
                if cfg.data == "digits" or (ds.kind == "vector" and ds.n_classes < 20)
                else "class"
            )
            if given_test is not None:  # the caller's own test set
                train, test = ds, given_test
                test_info = {"by": "given", "test_items": len(test)}
            else:
                train, test, test_info = split_dataset(
                    ds,
                    by=by,
                    test_fraction=cfg.test_fraction,
                    seed=cfg.seed,
                    test_classes=cfg.test_classes if by == "class" else None,
                    class_order=cfg.class_order,
                )
            self.train_full = train
            val, val_info = None, None
            if (cfg.val_fraction > 0 or cfg.val_folds > 1) and cfg.evaluate:
                if by == "class":  # open-set: whole (groups of) training classes held out
                    train, val, val_info = split_validation(
                        train,
                        fraction=cfg.val_fraction,
                        seed=cfg.seed + 1,
                        group_depth=cfg.val_group_depth,
                        folds=cfg.val_folds,
                        fold=cfg.val_fold,
                    )
                else:
                    if cfg.val_folds > 1:
                        raise InputError(
                            f"--val-folds {cfg.val_folds} holds out whole classes, but this "
                            "data set is split per sample (--split-by sample): use "
                            "--val-fraction F for a per-sample validation share, or "
                            "--split-by class"
                        )
                    train, val, val_info = split_dataset(
                        train, by="sample", test_fraction=cfg.val_fraction, seed=cfg.seed + 1
                    )
            if self.is_main:
                atomic_write_json(split_path, {"test": test_info, "val": val_info})
        self.train_set, self.val_set, self.test_set = train, val, test
        self.test_info = test_info
        if len(torch.unique(train.y)) < 2:
            raise InputError("the training split has fewer than 2 classes")

    def splits(self) -> dict:
        """The train / val / test data sets of this run (val None without validation)."""
        return {"train": self.train_set, "test": self.test_set, "val": self.val_set}

    def _build(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        ds = self.train_set
        self.features = None  # a frozen backbone's cached features (_prepare_features)
        if cfg.embedding_dim is None:
            cfg.embedding_dim = 64
        if ds.kind == "text":
            self.model = self._build_text_model().to(self.device)
        elif self._user_model is not None:
            self.model = self._user_model.to(self.device)
            self._initial_state = {
                k: v.detach().clone() for k, v in self.model.state_dict().items()
            }
        else:
            shape = self.files.input_shape if self.files is not None else ds.input_shape
            mcfg = default_model_config(shape, cfg.embedding_dim)
            if cfg.model:
                mcfg["name"] = cfg.model
            if cfg.backbone:
                mcfg.update({"name": "backbone", "backbone": cfg.backbone, "pool": cfg.pool})
                mcfg.update({"neck": cfg.neck, "freeze_bn": cfg.freeze_bn})
                frozen = cfg.freeze_stages == "all"
                mcfg["freeze_stages"] = cfg.freeze_stages if cfg.freeze_stages is not None else 0
                mcfg["tta"] = cfg.tta or ("flip" if frozen else "none")
                if cfg.feature_blocks:
                    mcfg["blocks"] = list(cfg.feature_blocks)
            mcfg.update(cfg.model_options)
            self.model = build_model(mcfg)
            if (cfg.pretrained or cfg.weights) and not self.resume:
                src = self.model.load_pretrained("imagenet" if cfg.pretrained else cfg.weights)
                self.log(f"backbone {cfg.backbone}: weights from {src}")
            self.model.to(self.device)
        # channels-last convolutions are faster on CUDA (tensor cores); on the CPU they are not
        self.channels_last = self.device.type == "cuda" and cfg.backbone is not None
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        # the caller's data is used as given (augment only when asked for by name)
        auto = default_augment(ds.kind, self.files is not None) if self._user_data is None else None
        aug = cfg.augment if cfg.augment is not None else auto
        aug_seed = cfg.seed + 2 + (1000 * self.dist.rank if self.dist else 0)  # own draws per rank
        self._aug_spec = aug
        self.augment = None
        if ds.kind == "image" and self.files is None:  # streamed images augment in the workers
            self.augment = build_augment(aug, seed=aug_seed)
        if self._user_loss is not None:
            self.loss_fn = self._user_loss
            for key in ("margin", "strategy", "distance", "soft_margin", "semihard_fallback"):
                if hasattr(self.loss_fn, key):  # recorded in config.json, used by the report
                    setattr(cfg, key, getattr(self.loss_fn, key))
        else:
            self.loss_fn = TripletLoss(
                margin=cfg.margin,
                strategy=cfg.strategy,
                distance=cfg.distance,
                soft_margin=cfg.soft_margin,
                semihard_fallback=cfg.semihard_fallback,
                seed=cfg.seed + 3,
            )
        self.criterion = self._build_criterion()
        n_cls = int(torch.unique(ds.y).numel())
        if cfg.p > n_cls:
            self.log(f"note: {n_cls} training classes, so P = {n_cls} classes per batch")
        if cfg.sampler == "hard-class":  # groups of close classes (hard_classes.py)
            self.sampler = HardClassSampler(
                ds.y, p=cfg.p, k=cfg.k, seed=cfg.seed, group=cfg.hard_class_group
            )
        else:
            self.sampler = PKSampler(ds.y, p=min(cfg.p, n_cls), k=cfg.k, seed=cfg.seed)
        if self.dist is not None:
            self.sampler = DistributedPKSampler(self.sampler, self.dist.rank, self.dist.world_size)
        self.total_steps = cfg.steps or self._epochs() * len(self.sampler)
        self.eval_every = cfg.eval_every or len(self.sampler)
        self.ckpt_every = cfg.checkpoint_every or self.eval_every
        if hasattr(self.model, "param_groups"):  # backbone: lower lr than the head
            params = self.model.param_groups(self._lr(), cfg.backbone_lr_mult)
        else:
            params = self.model.parameters()
        self.opt = torch.optim.AdamW(params, lr=self._lr(), weight_decay=cfg.weight_decay)
        self.stream = None
        if self.files is not None and not self._caches_features():
            from .image_data import make_stream

            self.stream = make_stream(self, aug)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: _lr_factor(s, cfg.warmup_steps, self.total_steps)
        )
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        if self.dist is not None:  # gradients averaged over ranks (the loss is scaled for it)
            # BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, ours on gloo
            if self.dist.backend == "nccl":
                self.forward = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.forward)
            else:
                self.forward = convert_sync_batchnorm_any(self.forward)
            self.forward = torch.nn.parallel.DistributedDataParallel(self.forward)
        self.state = _Running()
        self.model_config = (
            custom_model_config(self.model, ds, str(self.device))
            if self._user_model is not None
            else self.model.config
        )
        if self.is_main:
            write_run_config(
                self.run_dir,
                cfg.to_dict(),
                self.model_config,
                self.dataset,
                self.splits(),
                environment=environment(str(self.device), self.threads()),
            )
        if self.resume:
            self._restore()

    def _caches_features(self) -> bool:
        """True when the trainer computes frozen features once (:mod:`.feature_cache`):
        see :meth:`_cache_start`."""
        return self._cache_start() is not None

    def _cache_start(self) -> int | None:
        """What a one-process run caches: ``0`` the pooled features of a wholly frozen
        backbone (the head alone is trained); ``n`` > 0 the feature maps after its first ``n``
        frozen blocks (``--freeze-stages N``: the later blocks and the head are trained on
        them) when the augmentation is flips at most (they are cached as mirror images) and
        the maps fit in :data:`PREFIX_CACHE_BYTES`; None: nothing (images every step)."""
        if not hasattr(self, "_cache_start_n"):
            self._cache_start_n = self._choose_cache_start()
        return self._cache_start_n

    def _choose_cache_start(self) -> int | None:
        if self.dist is not None:
            return None
        if getattr(self.model, "frozen", False):
            return 0
        n = getattr(self.model, "prefix_blocks", 0)
        if not n or not _flips_only(self._aug_spec, self.files is not None):
            return None
        was = self.model.training
        self.model.eval()  # a dry run: no BatchNorm statistic may move
        try:
            with torch.no_grad():
                shape = self.model.prefix(torch.zeros(1, *self.model.input_shape), n).shape
        finally:
            self.model.train(was)
        n_images = len(self.train_set) + (len(self.val_set) if self.val_set is not None else 0)
        nbytes = 4 * math.prod(shape) * n_images * 2
        return n if nbytes <= PREFIX_CACHE_BYTES else None

    def _prepare_features(self) -> None:
        """Cache a frozen backbone's features (training flips them when the augmentation or
        ``tta`` does) and, at step 0, start the head as the whitening of the training features
        (``head_init``: default ``whiten`` for a frozen backbone)."""
        cfg = self.cfg
        cached = self._caches_features()
        frozen = bool(getattr(self.model, "frozen", False))
        whiten = cfg.head_init == "whiten" or (cfg.head_init is None and cached and frozen)
        if whiten and not hasattr(self.model, "init_whitening"):
            raise InputError("--head-init whiten needs a --backbone model")
        fresh = self.state.step == 0 and not self.resume
        if not cached and not (whiten and fresh):
            return
        from .feature_cache import FeatureCache, _Features

        if cached:
            streamed = self.files is not None
            flip = self.model.tta == "flip" or _augment_flips(self._aug_spec, streamed)
            start = self._cache_start()
            mirror = " and their mirror images" if flip else ""
            if start:
                self.log(
                    f"backbone blocks 0-{start - 1} frozen: caching their output for "
                    f"{len(self.train_set)} training images{mirror}; the later blocks and "
                    "the head train on it"
                )
            else:
                self.log(
                    f"backbone frozen: caching its features of {len(self.train_set)} "
                    f"training images{mirror}"
                )
            self.features = FeatureCache.build(self, flip, start=start)
        if whiten and fresh:
            fit = (
                self.features.fit_set(self.model)
                if cached
                else self.embed_split(self.train_set, model=_Features(self.model, False))[0]
            )
            d = self.model.init_whitening(fit)
            self.log(f"head: PCA whitening of the training features ({d} dimensions)")

    def _build_criterion(self) -> torch.nn.Module:
        """The loss of a step: the triplet loss, inside a cross-batch memory if asked."""
        cfg = self.cfg
        loss: torch.nn.Module = self.loss_fn
        if (self.dist is not None or cfg.memory_size > 0) and not isinstance(loss, TripletLoss):
            raise InputError(
                "--distributed and --memory-size need tripletlab's TripletLoss (a custom loss "
                "cannot be mined over gathered batches or a memory)"
            )
        if self.dist is not None:  # own anchors x the gathered global batch
            loss = DistributedTripletLoss(self.loss_fn, scale_for_ddp=True)
        if cfg.memory_size <= 0:
            return loss
        batch = cfg.p * cfg.k
        if cfg.memory_size < batch:
            raise InputError(
                f"--memory-size {cfg.memory_size} is smaller than the batch (P*K = {batch}): "
                f"use at least {batch} (a few batches, e.g. {8 * batch}), or 0 for no memory"
            )
        if cfg.memory_warmup < 0:
            raise InputError(f"--memory-warmup must be >= 0, got {cfg.memory_warmup}")
        return CrossBatchMemory(
            loss,
            size=cfg.memory_size,
            embedding_dim=cfg.embedding_dim,
            start_after=cfg.memory_warmup,
        ).to(self.device)

    def _is_text(self) -> bool:
        return self.train_set.kind in ("text", "triplets")

    def _lr(self) -> float:
        """``cfg.lr``, or its default: 1e-3, 3e-4 when fine-tuning an image backbone (1e-3
        overfits AT&T's validation identities within 50 steps), 2e-5 for a pretrained text
        encoder."""
        if self.cfg.lr is not None:
            return self.cfg.lr
        return 2e-5 if self._is_text() else 3e-4 if self.cfg.backbone else 1e-3

    def _epochs(self) -> int:
        """``cfg.epochs``, or its default: 20, and 1 for a pretrained text encoder."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        return 1 if self._is_text() else 20

    def _build_text_model(self) -> torch.nn.Module:
        """A pretrained text encoder (``--model minilm`` or a folder); its config.json and
        tokenizer are written to RUN/encoder so the run rebuilds it offline."""
        from ..models.text import ENCODER_DIR, build_text_encoder

        cfg = self.cfg
        mcfg = {"name": "text", "encoder": cfg.model or "minilm", **cfg.model_options}
        model = build_text_encoder(mcfg).to(self.device)
        model.save_encoder_files(self.run_dir / ENCODER_DIR)
        ds = self.dataset
        texts = (
            ds.texts
            if isinstance(ds, Dataset)
            else [t for part in (ds.anchors, ds.positives, ds.negatives) for t in part]
        )
        n_long = model.count_too_long(texts)
        ds.info["texts_truncated"] = n_long
        if n_long:
            self.log(
                f"note: {n_long} of {len(texts)} texts are longer than {model.max_length} "
                "tokens and are truncated"
            )
        return model

    # ---------------------------------------------------------------- checkpoints
