"""Defaults chosen from the data: input size and number of steps for image folders/manifests.

Only options the user left unset (``image_size`` None, ``steps`` None with the default epochs)
are chosen; the trainer prints every choice. The rules were set on validation identities held
out from the training classes (docs/training.md), never on a test split.

Example:
    >>> from tripletlab.config import TrainConfig
    >>> values, notes = auto_settings(TrainConfig(), 400, (112, 92), 40)
    >>> values["image_size"], values["steps"]
    ([61, 50], 600)
"""

from __future__ import annotations

import math

from .config import TrainConfig

__all__ = ["auto_settings"]

#: pixels per image for the small CNN (AT&T's 112x92 faces become 61x50) and for backbones
#: (ImageNet-pretrained CNNs need ~112 pixels a side; AT&T becomes 136x112)
CNN_PIXELS = 3072
BACKBONE_PIXELS = 136 * 112
_DEFAULT_EPOCHS = TrainConfig().epochs


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
    if cfg.image_size is None:
        pixels = BACKBONE_PIXELS if backbone else CNN_PIXELS
        size = _scaled(native_size, pixels, upscale=backbone)
        if native_size is None or list(native_size) != size:
            values["image_size"] = size
            src = f"{native_size[0]}x{native_size[1]}" if native_size else "mixed sizes"
            notes.append(
                f"image size {size[0]}x{size[1]} (from {src}; "
                + ("~136x112 pixels for an ImageNet backbone" if backbone else "~3,000 pixels")
                + "; --image-size H W to choose)"
            )
    if cfg.steps is None and cfg.epochs == _DEFAULT_EPOCHS:
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
