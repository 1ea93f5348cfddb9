"""Defaults chosen from the data: input size and number of steps for image folders/manifests.

Only options the user left unset (``image_size`` None, ``steps`` None with the default epochs)
are chosen; the trainer prints every choice. The rules were set on validation identities held
out from the training classes (docs/training.md), never on a test split.

Example:
    >>> from tripletlab.train.config import TrainConfig
    >>> values, notes = auto_settings(TrainConfig(), 400, (112, 92), 40)
    >>> values["image_size"], values["steps"]
    ([61, 50], 600)
"""

from __future__ import annotations

import math

from .config import TrainConfig

__all__ = ["auto_settings"]

#: pixels per image for the small CNN (AT&T's 112x92 faces become 61x50), for a backbone that
#: is fine-tuned (ImageNet-pretrained CNNs need ~112 pixels a side; AT&T becomes 136x112) and for
#: a frozen pretrained backbone (its features are computed once, so the larger input that
#: ImageNet features like costs little: AT&T becomes 272x224)
CNN_PIXELS = 3072
BACKBONE_PIXELS = 136 * 112
FROZEN_PIXELS = 272 * 224
#: the blocks a frozen pretrained MobileNetV2 describes images with (its last two 160-channel
#: blocks: better than the final 1280-channel layer on AT&T validation identities)
FROZEN_BLOCKS = {"mobilenet_v2": [15, 16]}
#: steps of the head on cached features (each one a linear layer: seconds in all)
FROZEN_STEPS = 300
MAX_WHITENED_DIM = 512
_DEFAULT_EPOCHS = TrainConfig().epochs


def _frozen_choices(cfg: TrainConfig, values: dict, notes: list[str]) -> None:
    """A pretrained backbone with no freezing asked for is frozen whole, described by the
    validated blocks, flipped at test time and its head whitened (docs/training.md)."""
    if cfg.backbone is None or not (cfg.pretrained or cfg.weights):
        return
    if cfg.freeze_stages is None:
        values["freeze_stages"] = "all"
        notes.append(
            "backbone frozen (--freeze-stages all): features computed once, the head trained "
            "on them (--freeze-stages 0 fine-tunes it)"
        )
    if values.get("freeze_stages", cfg.freeze_stages) != "all":
        return
    blocks = cfg.feature_blocks
    if blocks is None and cfg.backbone in FROZEN_BLOCKS:
        blocks = values["feature_blocks"] = FROZEN_BLOCKS[cfg.backbone]
        notes.append(
            f"features: blocks {' '.join(map(str, blocks))} of {cfg.backbone}, average-pooled "
            "(--feature-blocks I ...)"
        )
    if cfg.tta is None:
        values["tta"] = "flip"
        notes.append("embeddings of the image and its mirror image summed (--tta none)")
    if cfg.head_init is None:
        values["head_init"] = "whiten"
        notes.append("head starts as PCA whitening of the training features (--head-init random)")
    if cfg.embedding_dim is None:
        from ..models.backbones import BackboneEmbedding

        m = BackboneEmbedding([3, 64, 64], backbone=cfg.backbone, blocks=blocks, pool=cfg.pool)
        values["embedding_dim"] = min(m.num_features, MAX_WHITENED_DIM)
        notes.append(
            f"embedding size {values['embedding_dim']} (the features' size, at most "
            f"{MAX_WHITENED_DIM}; --embedding-dim N)"
        )


def _scaled(size: tuple[int, int] | None, pixels: int, upscale: bool) -> list[int]:
    if size is None:
        side = int(round(math.sqrt(pixels)))
        return [side, side]
    h, w = size
    s = math.sqrt(pixels / (h * w))
    if s >= 1 and not upscale:
        return [h, w]
    return [max(8, int(round(h * s))), max(8, int(round(w * s)))]


def auto_settings(
    cfg: TrainConfig,
    n_items: int,
    native_size: tuple[int, int] | None,
    n_classes: int,
) -> tuple[dict, list[str]]:
    """``(values, notes)``: the options to set on ``cfg`` and one line per choice.

    * a pretrained backbone with ``freeze_stages`` None is frozen whole (``"all"``): features
      of MobileNetV2's blocks 15 and 16, ``tta="flip"``, a whitened head of the features' size
      (at most 512), ~272x224 pixels and 300 steps of the head on cached features;
    * image size (``image_size`` None): backbones get ~136x112 pixels (aspect kept, upscaled
      if smaller: ImageNet features need it); the small CNN gets at most ~3,000 pixels (larger
      images are downscaled: faster, and no loss on faces at that size).
    * steps (``steps`` None and ``epochs`` at its default): backbones fine-tune for
      ``clamp(10 epochs, 150, 600)`` steps; the small CNN trains for ``clamp(30 epochs, 600,
      3000)``. An epoch is ``ceil(items / (P x K))`` batches.
    """
    values: dict = {}
    notes: list[str] = []
    backbone = cfg.backbone is not None
    _frozen_choices(cfg, values, notes)
    frozen = values.get("freeze_stages", cfg.freeze_stages) == "all"
    if cfg.image_size is None:
        pixels = FROZEN_PIXELS if frozen else BACKBONE_PIXELS if backbone else CNN_PIXELS
        size = _scaled(native_size, pixels, upscale=backbone)
        if native_size is None or list(native_size) != size:
            values["image_size"] = size
            src = f"{native_size[0]}x{native_size[1]}" if native_size else "mixed sizes"
            what = (
                "~272x224 pixels for a frozen ImageNet backbone"
                if frozen
                else "~136x112 pixels for an ImageNet backbone"
                if backbone
                else "~3,000 pixels"
            )
            notes.append(
                f"image size {size[0]}x{size[1]} (from {src}; {what}; --image-size H W to choose)"
            )
    if cfg.steps is None and cfg.epochs == _DEFAULT_EPOCHS and frozen:
        values["steps"] = FROZEN_STEPS
        notes.append(f"{FROZEN_STEPS} steps of the head on the cached features (--steps N)")
    elif cfg.steps is None and cfg.epochs == _DEFAULT_EPOCHS:
        per_batch = min(cfg.p, max(2, n_classes)) * cfg.k
        epoch = max(1, math.ceil(n_items / per_batch))
        lo, hi, n_ep = (150, 600, 10) if backbone else (600, 3000, 30)
        steps = int(min(hi, max(lo, n_ep * epoch)))
        values["steps"] = steps
        notes.append(
            f"{steps} steps ({n_ep} epochs of {epoch} batches, clamped to [{lo}, {hi}]; "
            "--steps N to choose)"
        )
    return values, notes
