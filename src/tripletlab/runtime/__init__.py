"""Where and how a run executes: the device and mixed precision (``devices.py``) and the torchrun
process group (``process_group.py``: join, leave, agree on a flag, BatchNorm over ranks)."""

from .devices import amp_dtype, autocast, grad_scaler, resolve_device

__all__ = ["amp_dtype", "autocast", "grad_scaler", "resolve_device"]
