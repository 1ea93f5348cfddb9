"""Embedding-collapse detection from the loss statistics of each training step."""

from __future__ import annotations

import math
import warnings

__all__ = ["CollapseDetector"]

_STUCK_STEPS = 200  # consecutive steps with the loss of collapsed embeddings, all triplets active


class CollapseDetector:
    """Detects embedding collapse from the loss statistics of each step.

    Collapsed embeddings (all one point) have d(a,p) = d(a,n) = 0, so every triplet is active and
    the loss equals the loss of a zero gap: the margin for the hinge, ln 2 ~ 0.693 for the soft
    margin (softplus(0)). A loss pinned there for ``patience`` consecutive steps, or a mean
    pairwise distance below 1e-3, is reported once.

    Example:
        >>> import warnings
        >>> det = CollapseDetector(margin=0.2, soft_margin=True, patience=3)
        >>> stats = {"active_fraction": 1.0, "mean_distance": 0.5}
        >>> with warnings.catch_warnings(record=True):
        ...     found = [det.update(stats, math.log(2), step) for step in range(3)]
        >>> [f is not None for f in found]
        [False, False, True]
    """

    def __init__(self, margin: float, soft_margin: bool, patience: int = _STUCK_STEPS) -> None:
        self.reference_loss = math.log(2.0) if soft_margin else float(margin)
        self.patience = patience
        self.stuck_steps = 0
        self.warned = False

    def update(self, stats: dict, loss: float, step: int) -> dict | None:
        """Feed one step; returns ``{"step", "mean_distance"}`` the first time collapse shows."""
        md = stats.get("mean_distance", 1.0)
        active = stats.get("active_fraction", 0)
        pinned = active > 0.99 and abs(loss - self.reference_loss) < 1e-3
        # loss pinned at the reference is normal for a few early batch-hard steps; persistent = bad
        self.stuck_steps = self.stuck_steps + 1 if pinned else 0
        if (md < 1e-3 or self.stuck_steps >= self.patience) and not self.warned:
            self.warned = True
            warnings.warn(
                f"embedding collapse at step {step}: mean pairwise distance {md:.2e}, "
                f"active fraction {active:.2f}, loss {loss:.4f} (the loss of collapsed "
                f"embeddings is {self.reference_loss:.4f}). Advice: lower the learning rate, use "
                "strategy 'semihard' instead of 'hard', or a larger batch with more classes (--p).",
                stacklevel=3,
            )
            return {"step": step, "mean_distance": md}
        return None
