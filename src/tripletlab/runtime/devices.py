"""Device selection and mixed precision: ``auto | cpu | cuda | cuda:N``, bf16/fp16 autocast.

Example:
    >>> resolve_device("cpu")
    device(type='cpu')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InputError

__all__ = ["amp_dtype", "autocast", "grad_scaler", "resolve_device"]


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    A CUDA device on a machine without one (or an index past the last GPU) is an
    :class:`~tripletlab.errors.InputError` that says what is available (the CLI exits 1).
    """
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        index = spec[5:] if spec.startswith("cuda:") else "0"
        if not index.isdigit():
            raise InputError(f"bad device {spec!r}: use auto, cpu, cuda or cuda:N")
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
            raise InputError(
                f"--device {spec} asked for a GPU, but CUDA is not available here ({build}); "
                "use --device cpu (or auto)"
            )
        n = torch.cuda.device_count()
        if int(index) >= n:
            raise InputError(f"--device {spec}: only {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
        return torch.device(f"cuda:{int(index)}")
    raise InputError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N")


def amp_dtype(device: torch.device, amp: bool | str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device``: None when off; ``True`` picks bfloat16 on
    the CPU and on GPUs that support it, else float16; ``"bf16"``/``"fp16"`` force one."""
    if amp in (False, None, "off", "none"):
        return None
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16"):
        if device.type == "cpu":
            raise InputError("fp16 autocast is for CUDA; use bf16 (or amp true) on the CPU")
        return torch.float16
    if amp is True or amp == "auto":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    raise InputError(f"amp must be true/false, 'bf16' or 'fp16', got {amp!r}")


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` for ``dtype``, or nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, dtype: torch.dtype | None):
    """A GradScaler for float16 on CUDA (bf16 needs none); None otherwise."""
    if device.type == "cuda" and dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None
