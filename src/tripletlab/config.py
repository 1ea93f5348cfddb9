"""Training defaults in one place; a JSON file overrides them, command-line flags override both."""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FileFormatError, InputError

__all__ = ["RECIPES", "TrainConfig", "load_config_file", "resolve_config"]


@dataclass
class TrainConfig:
    """Every training option, with the reason for its default."""

    data: str = "digits"  # scikit-learn's bundled digits: no download, trains in about a minute
    out: str | None = None  # run directory; default runs/<data>-<timestamp>
    seed: int = 0  # everything (init, split, sampler, augmentation) derives from it
    # --- data and split
    split_by: str | None = None  # None: "predefined" if the data has one, "sample" for digits,
    #                              else "class" (open-set: test identities never trained on)
    test_fraction: float = 0.25  # share of classes (or items) held out for the final test
    test_classes: list[str] | None = None  # explicit held-out classes (or class folders)
    class_order: str = "random"  # which classes test_fraction holds out: seeded "random" choice,
    #                              or "sorted": the last ones in natural order (s31..s40 of s1..s40)
    val_fraction: float = 0.1  # share of the training split used for validation; 0 = none
    image_size: list[int] | None = None  # [H, W]; None keeps the images' own size
    grayscale: bool | None = None  # None: grey if every image is single-channel
    skip_bad: bool = False  # skip unreadable files with a warning instead of failing
    # --- model
    model: str | None = None  # "cnn" for images, "mlp" for vectors when None
    embedding_dim: int = 64  # enough for faces/characters; cheap retrieval
    model_options: dict = field(default_factory=dict)  # e.g. {"channels": [32, 64, 128]}
    augment: Any = None  # preset name or dict; None: "light" for images, off for vectors
    # --- pretrained backbones (models/backbones.py)
    backbone: str | None = None  # mobilenet_v2 | resnet18 | resnet50 + embedding head; None: the
    #                              small CNN / MLP (--pretrained alone implies mobilenet_v2)
    pretrained: bool = False  # start from the built-in ImageNet weights (offline package)
    weights: str | None = None  # a torchvision-format checkpoint file for the backbone instead
    pool: str = "avg"  # backbone pooling: avg | gem
    neck: bool = False  # BatchNorm1d before the projection (BN-neck)
    freeze_bn: bool = True  # keep ImageNet BN statistics: PK batches are small and few-class
    freeze_stages: int = 0  # backbone stages (from the input) whose weights stay fixed
    backbone_lr_mult: float = 0.3  # backbone lr = lr x this: fine-tune gently, learn the head
    head_warmup_steps: int = 0  # first steps train the head alone (backbone frozen)
    # --- streamed images (data/streaming.py)
    stream: bool | None = None  # None: stream images from disk when decoded they exceed 512 MiB
    workers: int | None = None  # DataLoader processes for streamed images; None: min(2, cores)
    cache_mb: int = 1024  # streamed sets that fit are decoded once into shared memory (uint8)
    # --- loss
    strategy: str = "semihard"  # FaceNet semi-hard: stable from the first step
    margin: float = 0.2  # suits L2-normalised embeddings (distances in [0, 2])
    distance: str = "euclidean"
    soft_margin: bool = False
    semihard_fallback: str = "easiest"
    # --- optimisation
    p: int = 16  # classes per batch
    k: int = 4  # samples per class: K-1 positives per anchor
    steps: int | None = None  # total optimisation steps; overrides epochs
    epochs: int = 20  # passes over the training split (PK batches per epoch ~ N / (P*K))
    lr: float | None = None  # AdamW; None: 1e-3 for the small CNN / MLP, 3e-4 when fine-tuning a
    #                          backbone (1e-3 overfits AT&T's validation identities within 50 steps)
    weight_decay: float = 1e-4
    warmup_steps: int = 50  # linear warm-up, then cosine decay to 0
    grad_clip: float = 5.0  # max gradient norm; 0 disables
    skip_nonfinite: bool = False  # skip a step with NaN/Inf loss or gradients instead of stopping
    compile: bool = False  # torch.compile the model (rarely worth it on CPU)
    amp: bool = False  # bfloat16 autocast (CPU) / float16 (CUDA)
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads; None: 1 for vectors (a small MLP gains nothing
    #                             from more, and oversubscribed threads are slow), else one per core
    # --- evaluation and checkpoints
    eval_every: int | None = None  # steps between validations; None = once per epoch
    patience: int = 0  # stop after this many evaluations without MAP@R improvement; 0 = never
    checkpoint_every: int | None = None  # steps between resumable checkpoints; None = eval_every
    log_every: int = 10  # steps between metrics.jsonl lines
    eval_batch_size: int = 512
    evaluate: bool = True  # validate and test; False (--no-eval) just trains on all train items
    report: bool = True  # write report.html at the end
    quiet: bool = False  # no progress bar

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _check_types(values: dict, source: str) -> None:
    for k, v in values.items():
        if k not in _FIELDS:
            raise InputError(f"{source}: unknown option {k!r}")
        default = getattr(TrainConfig(), k)
        if v is None or default is None:
            continue
        if isinstance(default, bool) and not isinstance(v, bool):
            raise InputError(f"{source}: option {k!r} must be true/false, got {v!r}")
        if (
            isinstance(default, int)
            and not isinstance(default, bool)
            and (not isinstance(v, int) or isinstance(v, bool))
        ):
            raise InputError(f"{source}: option {k!r} must be an integer, got {v!r}")
        if isinstance(default, float) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise InputError(f"{source}: option {k!r} must be a number, got {v!r}")
        if isinstance(default, str) and not isinstance(v, str):
            raise InputError(f"{source}: option {k!r} must be a string, got {v!r}")
        if isinstance(default, dict) and not isinstance(v, dict):
            raise InputError(f"{source}: option {k!r} must be an object, got {v!r}")


_FACES_AUGMENT = {"affine_degrees": 10.0, "translate": 0.06, "scale": [0.9, 1.1], "hflip": True}

#: Named configurations for the real data sets of ``../shared/data`` (``--config NAME``). Each was
#: chosen on this project's 2-core CPU; docs/training.md lists the results and the alternatives
#: tried. Flags still override them.
RECIPES: dict[str, dict[str, Any]] = {
    # AT&T faces: open set, train s1-s30, test s31-s40 (the README protocol); 300 training photos
    # overfit a large network within a few hundred steps, so the CNN is small, keeps the spatial
    # layout of the aligned faces (flattened map), standardises each image (lighting) and
    # averages zoomed/mirrored views at test time (the photos differ mostly in scale).
    "att_faces": {
        "test_classes": [f"s{i}" for i in range(31, 41)],
        "split_by": "class",
        "image_size": [56, 46],
        "val_fraction": 0.0,
        "augment": _FACES_AUGMENT,
        "strategy": "semihard",
        "margin": 0.5,
        "p": 15,
        "k": 4,
        "steps": 800,
        "weight_decay": 5e-4,
        "model_options": {
            "channels": [16, 32, 64],
            "dropout": 0.3,
            "pool": "flatten",
            "input_norm": "per_image",
            "tta": {"scales": [0.8, 0.9, 1.0, 1.1, 1.25], "hflip": True},
        },
    },
    # AT&T faces with the ImageNet MobileNetV2 fine-tuned (--pretrained, offline weights).
    # Chosen on validation identities only (train s1-s20, validate s21-s30;
    # benchmarks/finetune_explore.py): head lr 3e-4 (1e-3 overfits within 50 steps), backbone
    # lr x0.3, ImageNet BN statistics kept, 30 head-only steps, ~136x112 input.
    "att_faces_pretrained": {
        "test_classes": [f"s{i}" for i in range(31, 41)],
        "split_by": "class",
        "image_size": [136, 112],
        "val_fraction": 0.0,
        "backbone": "mobilenet_v2",
        "pretrained": True,
        "embedding_dim": 128,
        "augment": _FACES_AUGMENT,
        "strategy": "semihard",
        "margin": 0.2,
        "p": 10,
        "k": 4,
        "steps": 150,
        "lr": 3e-4,
        "backbone_lr_mult": 0.3,
        "head_warmup_steps": 30,
        "warmup_steps": 0,
        "weight_decay": 1e-4,
    },
    # Omniglot background small1: train on 4 alphabets, test on the unseen Latin alphabet
    "omniglot": {
        "test_classes": ["Latin"],
        "split_by": "class",
        "image_size": [28, 28],
        "val_fraction": 0.1,
        "augment": "strokes",
        "strategy": "hard",
        "soft_margin": True,
        "p": 16,
        "k": 4,
        "steps": 1500,
        "eval_every": 250,
        "model_options": {"channels": [32, 64, 128], "dropout": 0.2},
        "weight_decay": 5e-4,
    },
    # Fashion-MNIST: the predefined train/t10k split; test -> train retrieval is reported
    "fashion_mnist": {
        "split_by": "predefined",
        "val_fraction": 0.05,
        "augment": {"translate": 0.06, "hflip": True},
        "strategy": "semihard",
        "p": 10,
        "k": 25,
        "steps": 600,
        "eval_every": 200,
        "model_options": {"channels": [32, 64, 128]},
        "weight_decay": 5e-4,
    },
}


def load_config_file(path: str | Path) -> dict:
    """Read a JSON config file (an object whose keys are TrainConfig fields), or return a copy of
    the recipe of that name (:data:`RECIPES`) when no such file exists."""
    p = Path(path)
    if not p.exists() and str(path) in RECIPES:
        return copy.deepcopy(RECIPES[str(path)])
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileFormatError(
            f"config file not found: {p} (built-in recipes: {', '.join(RECIPES)})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"cannot read config file {p}: {e}") from None
    if not isinstance(obj, dict):
        raise FileFormatError(f"config file {p} must hold a JSON object")
    _check_types(obj, f"config file {p}")
    return obj


def _check_choices(cfg: TrainConfig) -> None:
    """Names must come from the library's registries (checked before any data is loaded)."""
    from .distances import DISTANCES
    from .functional import SEMIHARD_FALLBACKS, STRATEGIES
    from .models import MODELS

    for key, allowed in (
        ("split_by", [None, "class", "sample", "predefined"]),
        ("class_order", ["random", "sorted"]),
        ("model", [None, *sorted(MODELS)]),
        ("strategy", list(STRATEGIES)),
        ("distance", list(DISTANCES)),
        ("semihard_fallback", list(SEMIHARD_FALLBACKS)),
    ):
        value = getattr(cfg, key)
        if value not in allowed:
            names = ", ".join(repr(a) for a in allowed if a is not None)
            raise InputError(f"unknown {key.replace('_', ' ')} {value!r}; choose one of {names}")


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- file <- overrides (flags); unknown keys and wrong types are errors."""
    values: dict = {}
    for src, vals in (("config file", file_values or {}), ("options", overrides or {})):
        _check_types(vals, src)
        values.update({k: v for k, v in vals.items() if v is not None or k in values})
    cfg = TrainConfig(**values)
    if cfg.p < 2 or cfg.k < 2:
        raise InputError(f"need p >= 2 classes and k >= 2 samples per class (got {cfg.p}, {cfg.k})")
    if cfg.steps is not None and cfg.steps < 1:
        raise InputError("steps must be >= 1")
    if cfg.epochs < 1:
        raise InputError("epochs must be >= 1")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError("threads must be >= 1")
    if cfg.lr is not None and (
        not isinstance(cfg.lr, (int, float)) or isinstance(cfg.lr, bool) or not cfg.lr > 0
    ):
        raise InputError(f"lr must be a positive number, got {cfg.lr!r}")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError("workers must be >= 0")
    if cfg.backbone_lr_mult < 0 or cfg.head_warmup_steps < 0 or cfg.freeze_stages < 0:
        raise InputError("backbone_lr_mult, head_warmup_steps and freeze_stages must be >= 0")
    if cfg.pool not in ("avg", "gem"):
        raise InputError(f"unknown pool {cfg.pool!r}; choose 'avg' or 'gem'")
    if (cfg.pretrained or cfg.weights) and cfg.backbone is None:
        cfg.backbone = "mobilenet_v2"
    if cfg.pretrained and cfg.weights:
        raise InputError(
            "give --pretrained (built-in ImageNet weights) or --weights FILE, not both"
        )
    if cfg.backbone is not None:
        from .models.backbones import BACKBONES

        if cfg.backbone not in BACKBONES:
            raise InputError(
                f"unknown backbone {cfg.backbone!r}; choose one of {', '.join(BACKBONES)}"
            )
        if cfg.model not in (None, "backbone"):
            raise InputError(f"--backbone builds its own model; drop --model {cfg.model}")
    from .devices import resolve_device

    resolve_device(cfg.device)  # a bad or unavailable device fails before any data is read
    _check_choices(cfg)
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InputError("val_fraction must be in [0, 1)")
    if cfg.image_size is not None and (
        len(cfg.image_size) != 2 or any(int(s) < 4 for s in cfg.image_size)
    ):
        raise InputError(f"image_size must be [H, W] with sides >= 4, got {cfg.image_size}")
    return cfg
