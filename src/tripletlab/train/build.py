"""Everything a :class:`~tripletlab.train.Trainer` trains with, made from a :class:`TrainConfig`.

Three steps, each a function of what it is given (nothing is written into a trainer):

1. :func:`prepare_splits` opens the data (``image_data.open_data``), resolves the defaults that
   depend on it (:func:`resolve_defaults`: learning rate, epochs, embedding size, augmentation,
   with the ``auto: ...`` lines it logs) and splits it into train / validation / test
   (``split.json``; reused on resume): a :class:`Splits`;
2. :func:`build_parts` builds the model, loss, sampler and batches, optimiser and schedule: a
   :class:`Parts`;
3. :func:`frozen_features` (at the start of ``fit``) caches a frozen backbone's features.

A :class:`Task` bundles the first two with the evaluator of a kind of data:
:data:`LABELLED_DATA` (labelled items, PK batches, retrieval metrics) here, the explicit-triplet
task in :mod:`tripletlab.train.triplet_file`.

Example:
    >>> from tripletlab.train.config import resolve_config
    >>> d = resolve_defaults(resolve_config(), kind="image", custom_data=False, notes=["x"])
    >>> d.lr, d.epochs, d.embedding_dim, d.augment, d.lines
    (0.001, 20, 64, 'light', ['auto: x'])
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import Dataset, apply_split, concat_labelled, split_dataset, split_validation
from ..data.augment import AugmentSpec, build_augment, default_augment
from ..errors import InputError
from ..losses.distributed import DistributedTripletLoss
from ..losses.memory import CrossBatchMemory
from ..losses.triplet import TripletLoss
from ..models import build_model, default_model_config
from ..rundir.files import read_json
from ..runtime.process_group import DistEnv, convert_sync_batchnorm_any
from ..samplers import DistributedPKSampler, HardClassSampler, PKSampler
from ..utils import atomic_write_json
from .batches import IndexBatches, StreamBatches, make_stream
from .config import TrainConfig
from .custom import custom_model_config

__all__ = [
    "LABELLED_DATA",
    "PREFIX_CACHE_BYTES",
    "Context",
    "Defaults",
    "Parts",
    "Splits",
    "Task",
    "auto_patience",
    "build_parts",
    "choose_threads",
    "flips_only",
    "frozen_features",
    "lr_factor",
    "prepare_splits",
    "resolve_defaults",
]

#: largest cache of frozen feature maps (``--freeze-stages N``) a trainer keeps in memory
PREFIX_CACHE_BYTES = 2 << 30

#: the embedding size of a run that sets none (and has no pretrained backbone: see auto)
DEFAULT_EMBEDDING_DIM = 64


def lr_factor(step: int, warmup: int, total: int) -> float:
    """The schedule's learning-rate factor at ``step``: linear warm-up, then cosine to 0.

    >>> [round(lr_factor(s, 2, 10), 3) for s in (0, 1, 2, 6, 10)]
    [0.5, 1.0, 1.0, 0.5, 0.0]
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Context:
    """Where and how a trainer runs (what building needs besides the config)."""

    run_dir: Path
    device: torch.device
    dist: DistEnv | None
    resume: bool
    log: Callable[..., Any]
    model: torch.nn.Module | None = None  # the caller's own module
    loss: torch.nn.Module | None = None  # the caller's own loss
    data: tuple | None = None  # the caller's own (train, test) data sets

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main


# ------------------------------------------------------------------ 1. data, defaults, splits
@dataclass
class Defaults:
    """The choices made for options left unset, and the lines logged about the data."""

    lr: float
    epochs: int
    embedding_dim: int
    augment: Any  # the augmentation spec (a preset name, a dict, an object or None)
    notes: list[str] = field(default_factory=list)  # the automatic choices made from the data
    lines: list[str] = field(default_factory=list)  # what is logged about them


def resolve_defaults(
    cfg: TrainConfig, kind: str, custom_data: bool, notes=(), streamed: bool = False
) -> Defaults:
    """Every default that depends on the data, in one place. ``kind``: the data's kind;
    ``custom_data``: the caller's own data set (used as given: no automatic augmentation);
    ``notes``: the automatic choices :func:`~tripletlab.train.image_data.open_data` made;
    ``streamed``: images read from disk by DataLoader workers.

    - lr: 1e-3; 3e-4 when fine-tuning an image backbone (1e-3 overfits AT&T's validation
      identities within 50 steps); 2e-5 for a pretrained text encoder;
    - epochs: 20; 1 for a pretrained text encoder;
    - embedding_dim: 64;
    - augment: :func:`~tripletlab.data.augment.default_augment` for images of the built-in
      loaders (``"light"`` in memory, ``"crop"`` when streamed), none otherwise.
    """
    text = kind in ("text", "triplets")
    lr = cfg.lr if cfg.lr is not None else 2e-5 if text else 3e-4 if cfg.backbone else 1e-3
    epochs = cfg.epochs if cfg.epochs is not None else 1 if text else 20
    auto_augment = None if custom_data else default_augment(kind, streamed)
    return Defaults(
        lr=lr,
        epochs=epochs,
        embedding_dim=cfg.embedding_dim if cfg.embedding_dim is not None else DEFAULT_EMBEDDING_DIM,
        augment=cfg.augment if cfg.augment is not None else auto_augment,
        notes=list(notes),
        lines=[f"auto: {line}" for line in notes],
    )


@dataclass
class Splits:
    """The data of a run: the whole ``dataset``, its train / val (None without) / test splits,
    ``train_full`` (train before the validation split), the test split's description
    (``test_info``) and, for streamed images, their ``files``."""

    dataset: Any
    train: Any
    val: Any
    test: Any
    train_full: Any
    test_info: dict
    files: Any = None


def prepare_splits(cfg: TrainConfig, ctx: Context) -> tuple[Splits, Defaults]:
    """Open and split the data of ``cfg`` (or the caller's own, ``ctx.data``); the split is
    written to ``split.json`` (rank 0) and read back on resume."""
    from .image_data import open_data

    files = None
    val_faces = None  # --faces with --val-data: the aligned validation folders
    if ctx.data is not None:
        if cfg.faces in ("auto", "none"):  # the caller's own tensors: no folder to align
            cfg.faces = None
        ds, given_test = ctx.data
        notes: list = []
    else:
        aligned = None
        resolve_faces(cfg, ctx)
        if cfg.faces is not None:  # issue #26: train on the aligned faces
            from .image_data import prepare_faces

            if ctx.dist is not None:  # torchrun: rank 0 aligns, every rank reads RUN_DIR/faces
                from .image_data import prepare_faces_on_main

                aligned, val_faces = prepare_faces_on_main(cfg, ctx.run_dir, ctx.log, ctx.device)
            else:
                aligned, val_faces = prepare_faces(cfg, ctx.run_dir, ctx.log)
        ds, files, notes = open_data(cfg, resume=ctx.resume, data=aligned)
        given_test = None
        apply_preprocessing(cfg.equalize, ds, files)
    defaults = resolve_defaults(cfg, ds.kind, ctx.data is not None, notes, files is not None)
    for line in defaults.lines:
        ctx.log(line)
    split_path = ctx.run_dir / "split.json"
    if ctx.resume and split_path.exists():
        info = read_json(split_path, "split")
        test_info = info["test"]
        train, test = (ds, given_test) if given_test is not None else apply_split(ds, test_info)
        train_full = train
        val_info = info.get("val")
        train, val = apply_split(train, val_info) if val_info else (train, None)
        val = add_val_data(cfg, ds, files, val, val_faces)
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
                by_source=bool(ds.info.get("sources")),  # several sources: a share of each
            )
        train_full = train
        val, val_info = None, None
        held_out = (cfg.val_fraction > 0 or cfg.val_folds > 1) and cfg.evaluate
        if cfg.val_data and val_mode(cfg) == "only":
            held_out = False  # validation on the --val-data sources alone
        if held_out:
            if by == "class":  # open-set: whole (groups of) training classes held out
                train, val, val_info = split_validation(
                    train,
                    fraction=cfg.val_fraction,
                    seed=cfg.seed + 1,
                    group_depth=cfg.val_group_depth,
                    folds=cfg.val_folds,
                    fold=cfg.val_fold,
                    by_source=bool(ds.info.get("sources")),  # drawn per training source
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
        val = add_val_data(cfg, ds, files, val, val_faces)
        split_info = {"test": test_info, "val": val_info}
        if val is not None and val.info.get("val_sources"):
            split_info["val_sources"] = val.info["val_sources"]
        if ctx.is_main:
            atomic_write_json(split_path, split_info)
    if len(torch.unique(train.y)) < 2:
        raise InputError("the training split has fewer than 2 classes")
    return Splits(ds, train, val, test, train_full, test_info, files), defaults


def apply_preprocessing(name: str | None, ds, files) -> None:
    """The run's image preprocessing (``--equalize``, :func:`tripletlab.data.augment.preprocess`)
    on an opened data set: in memory its images, streamed its ``files`` (each decoded file).
    Inference applies the same (``rundir.files.preprocessing``)."""
    if name in (None, "none"):
        return
    if ds.kind != "image":
        raise InputError(f"--equalize {name} preprocesses images; this data is {ds.kind} data")
    from ..data.augment import preprocess

    if files is not None:
        files.preprocess = name
    elif ds.x.numel():
        ds.x = preprocess(ds.x, name)


def val_mode(cfg: TrainConfig) -> str | None:
    """How ``--val-data`` is used: ``"both"`` (default with it: the held-out training
    classes and the other sources) or ``"only"``; None without ``--val-data``."""
    if not cfg.val_data:
        if cfg.val_mode is not None:
            raise InputError("--val-mode says how --val-data is used: give --val-data FOLDER")
        return None
    if cfg.val_mode == "only" and cfg.val_folds > 1:
        raise InputError(
            "--val-mode only validates on the --val-data sources alone: drop --val-folds "
            "(or use --val-mode both)"
        )
    return cfg.val_mode or "both"


def resolve_faces(cfg: TrainConfig, ctx: Context) -> None:
    """``--faces auto`` (the faces recipe) decided from a sample of the training images
    (:func:`tripletlab.faces.looks_like_photos`): ``arcface`` for photos, off for face crops,
    one ``auto:`` line; ``none`` is off. Resumed runs keep their recorded choice."""
    if cfg.faces == "none":
        cfg.faces = None
    if cfg.faces != "auto":
        return
    folders = [cfg.data] if isinstance(cfg.data, str) else list(cfg.data or [])
    if not folders or not all(Path(str(f)).is_dir() for f in folders):
        cfg.faces = None
        ctx.log("auto: --faces off (the data is not image folders)")
        return
    from ..errors import MissingDependencyError
    from ..faces import looks_like_photos

    try:
        photos, facts = looks_like_photos([str(f) for f in folders])
    except MissingDependencyError as e:
        cfg.faces = None
        ctx.log(f"auto: --faces off ({e})")
        return
    cfg.faces = "arcface" if photos else None
    area = facts["median_area"]
    seen = f"{facts['with_face']} of {facts['sampled']} sampled images hold a face"
    if area is not None:
        seen += f", its box {area:.0%} of the image (median)"
    ctx.log(
        f"auto: --faces arcface ({seen}: photos; faces are detected and aligned)"
        if photos
        else f"auto: --faces off ({seen}: face crops already; --faces arcface to align anyway)"
    )


def add_val_data(cfg: TrainConfig, ds, files, val, specs: list[str] | None = None):
    """The validation set of a run: the held-out training classes ``val`` (None: none) and,
    with ``--val-data``, the classes of the other sources
    (:func:`tripletlab.data.open.open_val_data`), joined into one data set whose
    ``info["val_sources"]`` lists each source (name, kind, items, classes) and
    ``info["val_groups"]`` the class ids of each (the evaluator scores each alone).
    ``specs``: read these folders instead of ``cfg.val_data`` (its aligned faces, ``--faces``)."""
    mode = val_mode(cfg)
    if mode is None or not cfg.evaluate:
        return val
    from ..data.open import open_val_data, source_of

    shape = files.input_shape if files is not None else ds.input_shape
    ext = open_val_data(
        specs or cfg.val_data,
        shape,
        ds,
        skip_bad=cfg.skip_bad,
        stream=files is not None,
        fit=cfg.resize or "stretch",
    )
    apply_preprocessing(cfg.equalize, ext, None if files is None else files)
    sources, groups = [], {}
    if val is not None and len(val):  # the held-out training classes: one group
        present = sorted(set(val.y.tolist()))
        groups["held-out"] = present
        held = {"name": "held-out", "kind": "held-out", "items": len(val), "classes": len(present)}
        if ds.info.get("sources"):  # drawn per training source
            names = [src["name"] for src in ds.info["sources"]]
            held["classes_per_source"] = {
                n: sum(1 for i in present if source_of(ds.classes[i]) == n) for n in names
            }
        sources.append(held)
    joined = concat_labelled([val, ext] if val is not None and len(val) else [ext])
    offset = len(val.classes) if val is not None and len(val) else 0
    for src in ext.info["val_sources"]:
        groups[src["name"]] = [
            offset + i for i, c in enumerate(ext.classes) if source_of(c) == src["name"]
        ]
        sources.append(src)
    joined.info = {**joined.info, "val_sources": sources, "val_groups": groups, "val_mode": mode}
    return joined


# ------------------------------------------------------------------ 2. model, loss, batches
@dataclass
class Parts:
    """What a trainer trains with (see :func:`build_parts`)."""

    model: torch.nn.Module
    model_config: dict
    loss_fn: torch.nn.Module  # the triplet loss (or the caller's)
    criterion: torch.nn.Module  # the loss of a step: loss_fn, inside DDP / a memory if asked
    sampler: Any  # the index sampler (resumable)
    batches: Any  # the training batches (:mod:`tripletlab.train.batches`)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward: Callable  # the model as a step runs it (compiled, DDP)
    total_steps: int
    eval_every: int
    checkpoint_every: int
    augment: Any = None  # in-memory image augmentation (its random stream is checkpointed)
    augment_spec: Any = None
    stream: Any = None  # the PK stream of streamed images
    channels_last: bool = False
    cache_start: int | None = None  # what the frozen-feature cache starts at (None: no cache)
    initial_state: dict | None = None  # a custom module's weights before training (report)
    whitening: dict | None = None  # how the head's whitening was chosen (frozen_features)


def build_parts(cfg: TrainConfig, splits: Splits, defaults: Defaults, ctx: Context) -> Parts:
    """Model, loss, sampler, batches, optimiser and schedule of labelled data (seeded: the
    same config builds the same parts). The order of the random draws is part of the run."""
    cfg.embedding_dim = defaults.embedding_dim  # recorded in config.json
    torch.manual_seed(cfg.seed)
    ds, device, dist = splits.train, ctx.device, ctx.dist
    initial_state = None
    if ds.kind == "text":
        model = build_text_model(cfg, ctx.run_dir, splits.dataset, ctx.log).to(device)
    elif ctx.model is not None:
        model = ctx.model.to(device)
        initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    else:
        shape = splits.files.input_shape if splits.files is not None else ds.input_shape
        model = build_model(model_config_of(cfg, shape))
        if (cfg.pretrained or cfg.weights) and not ctx.resume:
            src = model.load_pretrained("imagenet" if cfg.pretrained else cfg.weights)
            ctx.log(f"backbone {cfg.backbone}: weights from {src}")
        model.to(device)
    # channels-last convolutions are faster on CUDA (tensor cores); on the CPU they are not
    channels_last = device.type == "cuda" and cfg.backbone is not None
    if channels_last:
        model.to(memory_format=torch.channels_last)
    aug = defaults.augment
    augment = None
    if ds.kind == "image" and splits.files is None:  # streamed images augment in the workers
        aug_seed = cfg.seed + 2 + (1000 * dist.rank if dist else 0)  # own draws per rank
        augment = build_augment(aug, seed=aug_seed)
    loss_fn = ctx.loss if ctx.loss is not None else triplet_loss(cfg)
    if ctx.loss is not None:
        for key in ("margin", "strategy", "distance", "soft_margin", "semihard_fallback"):
            if hasattr(loss_fn, key):  # recorded in config.json, used by the report
                setattr(cfg, key, getattr(loss_fn, key))
    criterion = build_criterion(cfg, loss_fn, dist, device)
    n_cls = int(torch.unique(ds.y).numel())
    if cfg.p > n_cls:
        ctx.log(f"note: {n_cls} training classes, so P = {n_cls} classes per batch")
    if cfg.source_ratio and cfg.sampler == "hard-class":
        raise InputError("--source-ratio draws classes for the pk sampler: use --sampler pk")
    if cfg.sampler == "hard-class":  # groups of close classes (samplers/hard_class.py)
        sampler = HardClassSampler(
            ds.y, p=cfg.p, k=cfg.k, seed=cfg.seed, group=cfg.hard_class_group
        )
    else:
        weights = source_class_weights(cfg.source_ratio, ds, ctx.log)
        sampler = PKSampler(
            ds.y, p=min(cfg.p, n_cls), k=cfg.k, seed=cfg.seed, class_weights=weights
        )
    if dist is not None:
        sampler = DistributedPKSampler(sampler, dist.rank, dist.world_size)
    total_steps = cfg.steps or defaults.epochs * len(sampler)
    if cfg.lp_ft:  # linear probe, then fine-tune (Kumar et al. 2022): whitened head first
        cfg.head_init = cfg.head_init or "whiten"
        cfg.head_warmup_steps = cfg.head_warmup_steps or total_steps // 3
        ctx.log(
            f"LP-FT: the head starts as whitening and trains alone for {cfg.head_warmup_steps} "
            "steps, then the backbone fine-tunes with it"
        )
    eval_every = cfg.eval_every or len(sampler)
    if cfg.patience is None:  # recorded in config.json, as embedding_dim
        cfg.patience = auto_patience(total_steps, eval_every, splits.val is not None)
        if cfg.patience and ctx.is_main:
            ctx.log(
                f"auto: early stopping after {cfg.patience} validations without MAP@R "
                f"improvement (of {total_steps // max(eval_every, 1)}; --patience 0 = off)"
            )
    if hasattr(model, "param_groups"):  # backbone: lower lr than the head
        params = model.param_groups(defaults.lr, cfg.backbone_lr_mult)
    else:
        params = model.parameters()
    opt = torch.optim.AdamW(params, lr=defaults.lr, weight_decay=cfg.weight_decay)
    start = cache_start(model, aug, splits, dist)
    stream = None
    if splits.files is not None and start is None:
        stream = make_stream(cfg, splits.files, ds, sampler, aug)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, cfg.warmup_steps, total_steps)
    )
    forward = torch.compile(model) if cfg.compile else model
    if dist is not None:  # gradients averaged over ranks (the loss is scaled for it)
        # BatchNorm over the global batch: torch's SyncBatchNorm on CUDA, ours on gloo
        if dist.backend == "nccl":
            forward = torch.nn.SyncBatchNorm.convert_sync_batchnorm(forward)
        else:
            forward = convert_sync_batchnorm_any(forward)
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    if stream is not None:
        batches = StreamBatches(stream, device, channels_last)
    else:
        batches = IndexBatches(sampler, ds, device, augment, channels_last)
    return Parts(
        model=model,
        model_config=(
            custom_model_config(model, ds, str(device)) if ctx.model is not None else model.config
        ),
        loss_fn=loss_fn,
        criterion=criterion,
        sampler=sampler,
        batches=batches,
        optimizer=opt,
        scheduler=sched,
        forward=forward,
        total_steps=total_steps,
        eval_every=eval_every,
        checkpoint_every=cfg.checkpoint_every or eval_every,
        augment=augment,
        augment_spec=aug,
        stream=stream,
        channels_last=channels_last,
        cache_start=start,
        initial_state=initial_state,
    )


def auto_patience(total_steps: int, eval_every: int, validated: bool = True) -> int:
    """The default early-stopping patience: a quarter of the run's validations, at least 10;
    0 (off) without validation or with fewer than 20 validations (too few to tell a plateau).

    Example:
        >>> auto_patience(600, 4), auto_patience(100, 10), auto_patience(600, 4, validated=False)
        (37, 0, 0)
    """
    n_evals = total_steps // max(int(eval_every), 1)
    if not validated or n_evals < 20:
        return 0
    return max(10, n_evals // 4)


def parse_source_ratio(text: str, names: list[str]) -> dict[str, float]:
    """The weight of each source of ``--source-ratio`` (``"1:1"`` in source order, or
    ``"name=2,name=1"``), normalised to sum 1.

    >>> parse_source_ratio("3:1", ["a", "b"])
    {'a': 0.75, 'b': 0.25}
    >>> parse_source_ratio("b=1,a=1", ["a", "b"])
    {'a': 0.5, 'b': 0.5}
    """
    try:
        if "=" in text:
            pairs = [part.split("=", 1) for part in text.split(",") if part.strip()]
            given = {k.strip(): float(v) for k, v in pairs}
        else:
            w = [float(v) for v in text.split(":")]
    except ValueError:
        raise InputError(
            f"--source-ratio {text!r}: give numbers, e.g. 1:1 or {names[0]}=2,..."
        ) from None
    if "=" in text:
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InputError(f"--source-ratio names {unknown}, which are not sources ({names})")
        w = [given.get(n, 0.0) for n in names]
    if len(w) != len(names):
        raise InputError(
            f"--source-ratio {text!r} gives {len(w)} weights for {len(names)} sources ({names})"
        )
    if any(not math.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
        raise InputError(f"--source-ratio {text!r}: weights must be >= 0, not all 0")
    return {n: v / sum(w) for n, v in zip(names, w, strict=True)}


def source_class_weights(ratio: str | None, train, log) -> dict | None:
    """Per-class sampling weights for ``--source-ratio`` (each source's share spread evenly
    over its training classes), or None (classes equally often: each source in proportion to
    its classes)."""
    if not ratio:
        return None
    sources = train.info.get("sources")
    if not sources:
        raise InputError("--source-ratio needs several training sources (--data A --data B)")
    from ..data.open import source_of

    names = [src["name"] for src in sources]
    share = parse_source_ratio(ratio, names)
    present = sorted(set(train.y.tolist()))
    n_of = {n: sum(1 for i in present if source_of(train.classes[i]) == n) for n in names}
    weights = {
        i: share[source_of(train.classes[i])] / max(1, n_of[source_of(train.classes[i])])
        for i in present
    }
    log(
        "sources: "
        + ", ".join(f"{n} {n_of[n]} classes, {share[n]:.0%} of each batch's" for n in names)
        + " classes (--source-ratio)"
    )
    return weights


def model_config_of(cfg: TrainConfig, input_shape) -> dict:
    """The model config (``build_model``) of the options of ``cfg`` for inputs of a shape."""
    mcfg = default_model_config(input_shape, cfg.embedding_dim)
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
    return mcfg


def triplet_loss(cfg: TrainConfig, **overrides) -> TripletLoss:
    """tripletlab's triplet loss with the options of ``cfg`` (seeded: ``seed + 3``)."""
    options = {
        "margin": cfg.margin,
        "strategy": cfg.strategy,
        "distance": cfg.distance,
        "soft_margin": cfg.soft_margin,
        "semihard_fallback": cfg.semihard_fallback,
        "seed": cfg.seed + 3,
    }
    return TripletLoss(**{**options, **overrides})


def build_criterion(
    cfg: TrainConfig, loss_fn: torch.nn.Module, dist: DistEnv | None, device: torch.device
) -> torch.nn.Module:
    """The loss of a step: the triplet loss, over the gathered global batch under
    ``--distributed``, inside a cross-batch memory with ``--memory-size``."""
    loss: torch.nn.Module = loss_fn
    if (dist is not None or cfg.memory_size > 0) and not isinstance(loss, TripletLoss):
        raise InputError(
            "--distributed and --memory-size need tripletlab's TripletLoss (a custom loss "
            "cannot be mined over gathered batches or a memory)"
        )
    if dist is not None:  # own anchors x the gathered global batch
        loss = DistributedTripletLoss(loss_fn, scale_for_ddp=True)
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
        loss, size=cfg.memory_size, embedding_dim=cfg.embedding_dim, start_after=cfg.memory_warmup
    ).to(device)


def build_text_model(cfg: TrainConfig, run_dir: Path, dataset, log) -> torch.nn.Module:
    """A pretrained text encoder (``--model minilm`` or a folder); its config.json and
    tokenizer are written to RUN/encoder so the run rebuilds it offline."""
    from ..models.text import ENCODER_DIR, build_text_encoder

    mcfg = {"name": "text", "encoder": cfg.model or "minilm", **cfg.model_options}
    model = build_text_encoder(mcfg)
    model.save_encoder_files(run_dir / ENCODER_DIR)
    ds = dataset
    texts = (
        ds.texts
        if isinstance(ds, Dataset)
        else [t for part in (ds.anchors, ds.positives, ds.negatives) for t in part]
    )
    n_long = model.count_too_long(texts)
    ds.info["texts_truncated"] = n_long
    if n_long:
        log(
            f"note: {n_long} of {len(texts)} texts are longer than {model.max_length} "
            "tokens and are truncated"
        )
    return model


# ------------------------------------------------------------------ 3. frozen-feature cache
def read_augment(aug, streamed: bool) -> AugmentSpec | None:
    """The :class:`~tripletlab.data.augment.AugmentSpec` ``aug`` names (one vocabulary for
    in-memory and streamed images; None when streamed: the streamed default); raises
    :class:`InputError` for an unknown one."""
    if aug is None and streamed:
        aug = default_augment("image", streamed=True)
    return AugmentSpec.from_config(aug)


def augment_flips(aug, streamed: bool) -> bool:
    """True when the augmentation ``aug`` mirrors images (its cached features then include
    the mirror images')."""
    if aug is not None and not isinstance(aug, (str, dict)):
        return bool(getattr(aug, "hflip", False))
    try:
        return bool(getattr(read_augment(aug, streamed), "hflip", False))
    except InputError:
        return False


def flips_only(aug, streamed: bool) -> bool:
    """True when the augmentation ``aug`` (a preset name, a dict or None) is at most
    horizontal flips: cached feature maps of images and their mirror images reproduce it.
    ``streamed``: the spec as streamed images read it (``image_data.stream_augment``).

    >>> flips_only("flip", streamed=False), flips_only("light", streamed=False)
    (True, False)
    """
    if isinstance(aug, str) and aug == "none":
        return True
    if aug is not None and not isinstance(aug, (str, dict)):
        return False
    try:
        a = read_augment(aug, streamed)
    except InputError:
        return False
    return a is None or a.flips_only


def cache_start(model: torch.nn.Module, aug, splits: Splits, dist: DistEnv | None) -> int | None:
    """What a one-process run caches: ``0`` the pooled features of a wholly frozen backbone
    (the head alone is trained); ``n`` > 0 the feature maps after its first ``n`` frozen
    blocks (``--freeze-stages N``: the later blocks and the head are trained on them) when the
    augmentation is flips at most (they are cached as mirror images) and the maps fit in
    :data:`PREFIX_CACHE_BYTES`; None: nothing (images every step)."""
    if dist is not None:
        return None
    if getattr(model, "frozen", False):
        return 0
    n = getattr(model, "prefix_blocks", 0)
    if not n or not flips_only(aug, splits.files is not None):
        return None
    was = model.training
    model.eval()  # a dry run: no BatchNorm statistic may move
    try:
        with torch.no_grad():
            shape = model.prefix(torch.zeros(1, *model.input_shape), n).shape
    finally:
        model.train(was)
    n_images = len(splits.train) + (len(splits.val) if splits.val is not None else 0)
    nbytes = 4 * math.prod(shape) * n_images * 2
    return n if nbytes <= PREFIX_CACHE_BYTES else None


def frozen_features(
    cfg: TrainConfig,
    model: torch.nn.Module,
    splits: Splits,
    parts: Parts,
    embed_split: Callable,
    fresh: bool,
    log,
    score: Callable | None = None,
):
    """Cache a frozen backbone's features (training flips them when the augmentation or
    ``tta`` does) and, for a ``fresh`` run, start the head as the whitening of the training
    features (``head_init``: default ``whiten`` for a frozen backbone), shrunk toward the
    identity as ``cfg.whiten_shrink`` says (:func:`~tripletlab.train.robust.choose_whitening`:
    a grid is scored by ``score(features)``, the validation score of the model with the cache
    ``features``). Returns the :class:`~tripletlab.train.feature_cache.FeatureCache` (None:
    nothing cached). ``embed_split(part, model=...)``: how the trainer embeds a split."""
    cached = parts.cache_start is not None
    frozen = bool(getattr(model, "frozen", False))
    whiten = cfg.head_init == "whiten" or (cfg.head_init is None and cached and frozen)
    if whiten and not hasattr(model, "init_whitening"):
        raise InputError("--head-init whiten needs a --backbone model")
    if not cached and not (whiten and fresh):
        return None
    from .feature_cache import FeatureCache, backbone_features

    features = None
    if cached:
        streamed = splits.files is not None
        flip = model.tta == "flip" or augment_flips(parts.augment_spec, streamed)
        start = parts.cache_start
        mirror = " and their mirror images" if flip else ""
        if start:
            log(
                f"backbone blocks 0-{start - 1} frozen: caching their output for "
                f"{len(splits.train)} training images{mirror}; the later blocks and "
                "the head train on it"
            )
        else:
            log(
                f"backbone frozen: caching its features of {len(splits.train)} "
                f"training images{mirror}"
            )
        import time

        t0 = time.perf_counter()
        n_val = len(splits.val) if splits.val is not None else 0
        log(
            f"  computing them once: {len(splits.train) * (2 if flip else 1) + n_val} images "
            "through the frozen blocks (a minute or more for a pretrained backbone on CPU)"
        )
        features = FeatureCache.build(
            embed_split, model, splits.train, splits.val, flip, start=start, seed=cfg.seed + 4
        )
        log(f"  features cached in {time.perf_counter() - t0:.0f}s")
        if cfg.cached_views > 1:
            add_cached_views(cfg, model, splits, parts, features, log)
    if whiten and fresh:
        fit = (
            features.fit_set(model)
            if cached
            else embed_split(splits.train, model=backbone_features(model))[0]
        )
        from .robust import choose_whitening

        line, record = choose_whitening(
            model,
            fit,
            cfg.whiten_shrink,
            cfg.whiten_power,
            score=(lambda: score(features)) if score is not None else None,
        )
        parts.whitening = record
        log(line)
    return features


def add_cached_views(cfg: TrainConfig, model, splits: Splits, parts: Parts, features, log):
    """``--cached-views N``: features of N - 1 augmented views of each training image (the
    run's augmentation, seeded per view and item) added to the cache of a wholly frozen
    backbone, as many as fit in ``--cache-mb`` with the features already cached; the number
    cached is logged and recorded (``features.n_views``)."""
    from .feature_cache import augmented_view_features

    if cfg.cached_views < 1:
        raise InputError(f"--cached-views must be >= 1, got {cfg.cached_views}")
    if features.start:
        log("--cached-views: only for a wholly frozen backbone (--freeze-stages all); not used")
        return
    streamed = splits.files is not None
    spec = read_augment(parts.augment_spec, streamed)
    if spec is None or spec.flips_only:
        log("--cached-views: the augmentation is flips at most (nothing more to cache)")
        return
    per_view = features.train.numel() * 4
    held = per_view * (2 if features.train_mirror is not None else 1)
    fit = max(0, (cfg.cache_mb * 2**20 - held) // max(1, per_view))
    n = int(min(cfg.cached_views - 1, fit))
    if n < cfg.cached_views - 1:
        log(
            f"--cached-views {cfg.cached_views}: {n + 1} views fit in --cache-mb {cfg.cache_mb} "
            f"({per_view / 2**20:.1f} MiB a view)"
        )
    if n <= 0:
        return
    views = augmented_view_features(
        model, splits.train, spec, n, cfg.seed + 5, files=splits.files,
        device=next(model.parameters()).device, batch_size=cfg.eval_batch_size,
        workers=cfg.workers,
    )  # fmt: skip
    features.add_views(views)
    log(
        f"cached {n} augmented views of each training image besides the image itself "
        f"({features.n_views} views, {(n * per_view) / 2**20:.1f} MiB): each batch draws one"
    )


# ------------------------------------------------------------------ threads
def choose_threads(
    cfg: TrainConfig,
    device: torch.device,
    data: Splits,
    parts: Parts,
    run_dir: Path,
    resume: bool,
    log,
) -> int | None:
    """CPU threads for this run (None: torch's setting). ``cfg.threads`` when given; 1 for
    vector data (a small MLP step gains nothing from more threads and slows down badly on
    a busy machine); for images the faster of one thread and torch's default, measured on a
    PK batch at the start (:func:`measure_threads`), reused on resume."""
    if cfg.threads:
        return cfg.threads
    if device.type != "cpu":
        return None
    kind = getattr(data.train, "kind", None)
    if kind == "vector":
        return 1
    if kind != "image":  # text encoders: torch's default
        return None
    if resume and (run_dir / "config.json").exists():
        env = read_json(run_dir / "config.json", "run config").get("environment") or {}
        if isinstance(env.get("threads"), int) and env["threads"] >= 1:
            return env["threads"]
    n = parts.sampler.p * parts.sampler.k  # one PK batch
    if data.files is not None:  # streamed images: a batch of their shape
        x = torch.rand(n, *data.files.input_shape, device=device)
    else:
        x = data.train.x[:n].to(device)
    return measure_threads(parts.model, x, log)


def measure_threads(model: torch.nn.Module, x: torch.Tensor, log, steps: int = 2) -> int | None:
    """Time forward + backward of the batch ``x`` on a copy of ``model`` (training state and
    random streams untouched) with torch's default threads and with one; the default must be
    more than 10% faster to be used (a busy machine often makes it slower)."""
    many = torch.get_num_threads()
    if many <= 1:
        return 1
    try:
        model = copy.deepcopy(model).train()
    except Exception:  # noqa: BLE001 - a module that cannot be copied: torch's default
        return None
    frozen = bool(getattr(model, "frozen", False))
    if frozen:  # a frozen backbone's work is one inference pass: time a small one
        x, steps = x[:8], 1

    def seconds(n: int) -> float:
        torch.set_num_threads(n)
        best = float("inf")
        with torch.random.fork_rng(devices=[]):
            for i in range(steps + 1):
                t = time.perf_counter()
                if frozen:
                    with torch.no_grad():
                        model.features(x)
                else:
                    model(x).square().sum().backward()
                if i:  # the first pass warms up
                    best = min(best, time.perf_counter() - t)
        return best

    try:
        t_many, t_one = seconds(many), seconds(1)
    finally:
        torch.set_num_threads(many)
    choice = 1 if t_one <= 1.1 * t_many else many
    log(
        f"threads: {choice} (a step took {t_many:.3f} s with {many} threads, {t_one:.3f} s "
        "with 1; --threads N sets it)"
    )
    return choice


# ------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    """What a trainer trains on: how its data is prepared (``prepare(cfg, ctx) -> (Splits,
    Defaults)``), how its parts are built (``build(cfg, splits, defaults, ctx) -> Parts``) and
    how a model of it is evaluated (``evaluator()``: see :mod:`tripletlab.train.evaluation`)."""

    prepare: Callable[[TrainConfig, Context], tuple[Splits, Defaults]]
    build: Callable[[TrainConfig, Splits, Defaults, Context], Parts]
    evaluator: Callable[[], Any]
    #: False: steps run without autocast (the explicit-triplet loop never used it)
    autocast: bool = True


def _retrieval_evaluator():
    from .evaluation import RetrievalEvaluator

    return RetrievalEvaluator()


#: labelled items (vectors, images, texts): PK batches, retrieval metrics
LABELLED_DATA = Task(prepare_splits, build_parts, _retrieval_evaluator)
