"""Keep what the backbone knew: a run with a pretrained backbone must not end worse, on
validation, than the model it started from (issue #23).

Fine-tuning on a small set distorts pretrained features and can lose to them off the training
domain (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution", ICLR 2022). What this module gives a :class:`~tripletlab.train.Trainer`,
each chosen on the validation split, never assumed:

- the **guard**: the untrained backbone's plain pooled features (no head,
  :meth:`~tripletlab.models.backbones.BackboneEmbedding.init_identity`) and the starting head
  are candidates next to the trained model, scored first, kept when training does not beat
  them;
- **whitening shrinkage** (:func:`choose_whitening`): the head's whitening shrunk toward the
  identity, strength from a grid (:data:`SHRINK_GRID`) or Ledoit-Wolf's estimate;
- **WiSE-FT** weight-space interpolation ``start + alpha (trained - start)`` (Wortsman et al.,
  "Robust fine-tuning of zero-shot models", CVPR 2022; :func:`interpolate_state`), alpha from
  :data:`ALPHA_GRID`;
- **L2-SP** (Li et al., "Explicit inductive bias for transfer learning with convolutional
  networks", ICML 2018; :func:`l2sp_penalty`): ``strength/2 ||w - w_start||^2`` in the loss.

The functions are pure (states, scores, callables); :func:`begin` and :func:`finish` wire them
to a trainer, which calls them once at the start and once after the last step.

Example:
    >>> a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    >>> interpolate_state(a, b, 0.25)["w"].tolist()
    [0.25, 0.25]
    >>> pick([("untrained", 0.5), ("start", 0.5), ("trained", 0.4)]).name  # a tie: the first
    'untrained'
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import InputError

__all__ = [
    "ALPHA_GRID",
    "SHRINK_GRID",
    "Pick",
    "check_robust_options",
    "choose_whitening",
    "interpolate_state",
    "l2sp_penalty",
    "parse_interpolate",
    "parse_shrink",
    "pick",
]

#: WiSE-FT mixing weights tried by ``--interpolate auto`` (0: the starting weights, 1: trained)
ALPHA_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)
#: whitening shrinkage toward the identity tried by ``--whiten-shrink auto``
SHRINK_GRID = (0.0, 0.1, 0.3, 0.6, 1.0)

START_FILE = "start.safetensors"
UNTRAINED_FILE = "untrained.safetensors"


def _unit(value: str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{what} must be auto, a number in [0, 1]{', lw' if 'shr' in what else ''}"
                         f" or none, got {value!r}")  # fmt: skip
    return v


def parse_interpolate(value: str | float | None) -> tuple[float, ...] | None:
    """The alphas ``--interpolate`` tries: ``auto`` the grid, a number that one, ``none``
    (or None) no interpolation.

    >>> parse_interpolate("auto"), parse_interpolate("0.5"), parse_interpolate("none")
    ((0.0, 0.25, 0.5, 0.75, 1.0), (0.5,), None)
    """
    if value is None or str(value).lower() == "none":
        return None
    if str(value).lower() == "auto":
        return ALPHA_GRID
    return (_unit(value, "--interpolate"),)


def parse_shrink(value: str | float | None) -> tuple[float | None, ...]:
    """The shrinkages ``--whiten-shrink`` tries: ``auto`` the grid, ``lw`` (or None)
    Ledoit-Wolf's estimate (``None`` in the tuple), a number that one.

    >>> parse_shrink("auto")[:2], parse_shrink("lw"), parse_shrink("0.3")
    ((0.0, 0.1), (None,), (0.3,))
    """
    if value is None or str(value).lower() == "lw":
        return (None,)
    if str(value).lower() == "auto":
        return SHRINK_GRID
    return (_unit(value, "--whiten-shrink"),)


def check_robust_options(cfg) -> None:
    """Raise :class:`InputError` for a bad value of the options of this module."""
    parse_interpolate(cfg.interpolate)
    parse_shrink(cfg.whiten_shrink)
    if not 0.0 <= cfg.whiten_power <= 1.0:
        raise InputError(f"--whiten-power must be in [0, 1], got {cfg.whiten_power}")
    if not cfg.anchor_weights >= 0:
        raise InputError(f"--anchor-weights must be >= 0, got {cfg.anchor_weights}")
    if cfg.lp_ft and cfg.freeze_stages == "all":
        raise InputError("--lp-ft fine-tunes the backbone: it needs --freeze-stages 0 (or N)")
    if cfg.lp_ft and cfg.backbone is None:
        raise InputError("--lp-ft needs a --backbone model")


# ------------------------------------------------------------------ pure functions
def interpolate_state(
    start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``start + alpha (trained - start)`` for every floating tensor; alpha 0 is
    exactly ``start``, 1 exactly ``trained``; other tensors (counters) come from ``trained``.
    Both states must have the same keys and shapes."""
    if set(start) != set(trained):
        raise InputError("cannot interpolate weights of different models (their keys differ)")
    out = {}
    for k, t in trained.items():
        s = start[k]
        if alpha == 0.0:
            out[k] = s.detach().clone()
        elif alpha == 1.0 or not t.is_floating_point():
            out[k] = t.detach().clone()
        else:
            out[k] = torch.lerp(s.detach().to(t.dtype), t.detach(), float(alpha))
    return out


def l2sp_penalty(
    model: torch.nn.Module, anchor: dict[str, torch.Tensor], strength: float
) -> torch.Tensor:
    """L2-SP: ``strength / 2 * sum ||w - w_start||^2`` over ``model``'s trainable parameters
    that ``anchor`` (a state dict of the starting weights) holds.

    >>> lin = torch.nn.Linear(2, 1)
    >>> start = {k: v.detach().clone() for k, v in lin.state_dict().items()}
    >>> float(l2sp_penalty(lin, start, 1.0))
    0.0
    """
    total = torch.zeros((), device=next(model.parameters()).device)
    for name, p in model.named_parameters():
        if p.requires_grad and name in anchor:
            total = total + (p - anchor[name].to(p.device, p.dtype)).pow(2).sum()
    return 0.5 * strength * total


@dataclass
class Pick:
    """The candidate kept (``name``), its validation ``score`` and every candidate's."""

    name: str
    score: float | None
    scores: dict[str, float | None] = field(default_factory=dict)


def pick(scored: Sequence[tuple[str, float | None]]) -> Pick:
    """The best of ``(name, score)`` pairs in order; a tie keeps the earlier one (the
    candidates come simplest first: untrained, start, ..., trained); None scores lose."""
    best: tuple[str, float | None] | None = None
    for name, score in scored:
        if best is None or (score is not None and (best[1] is None or score > best[1])):
            best = (name, score)
    if best is None:
        raise InputError("no candidate to choose from")
    return Pick(best[0], best[1], dict(scored))


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {'-' if v is None else f'{v:.4f}'}" for k, v in scores.items())


def choose_whitening(
    model,
    features: torch.Tensor,
    shrink: str | float | None,
    power: float = 0.5,
    score: Callable[[], float | None] | None = None,
    metric: str = "map_at_r",
) -> tuple[str, dict]:
    """Start ``model``'s head as whitening of ``features`` (all training features), its
    shrinkage from ``parse_shrink(shrink)``: one value is used; a grid is scored by
    ``score()`` (the validation score of the model as it is) and the best kept (a tie: the
    smaller shrinkage), Ledoit-Wolf's estimate without ``score``. Returns the line to log and
    what to record."""
    grid = parse_shrink(shrink)
    scores: dict[str, float | None] = {}
    if len(grid) > 1 and score is not None:
        for s in grid:
            model.init_whitening(features, shrink=s, power=power)
            scores[f"{s:g}"] = score()
        best = pick(list(scores.items()))
        chosen: float | None = float(best.name)
        how = f"chosen on validation {metric} ({_fmt(scores)})"
    elif len(grid) > 1:
        chosen, how = None, "Ledoit-Wolf's estimate (no validation split to choose on)"
    else:
        chosen, how = grid[0], "Ledoit-Wolf's estimate" if grid[0] is None else "as given"
    d = model.init_whitening(features, shrink=chosen, power=power)
    used = float(model.whiten_shrink)
    line = (
        f"head: PCA whitening of the training features ({d} dimensions of {len(features)} "
        f"vectors), shrinkage {used:.3g} toward the identity, {how} (--whiten-shrink)"
    )
    return line, {"dimensions": d, "shrink": used, "power": power, "val_scores": scores}


def _alpha_name(alpha: float) -> str:
    return "start" if alpha == 0 else "trained" if alpha == 1 else f"alpha={alpha:g}"


def candidates(
    start: dict, trained: dict, untrained: dict | None, alphas: Sequence[float] | None
) -> list[tuple[str, dict]]:
    """The models a run chooses from at the end, simplest first: the untrained features (if
    given), the start, the interpolations of ``alphas`` (strictly between 0 and 1), trained."""
    out = [("untrained", untrained)] if untrained is not None else []
    out.append(("start", start))
    for a in alphas or ():
        if 0.0 < a < 1.0:
            out.append((_alpha_name(a), interpolate_state(start, trained, a)))
    out.append(("trained", trained))
    return out


# ------------------------------------------------------------------ a trainer's start and end
def active(cfg, model) -> dict:
    """What a run of ``cfg`` does of this module: ``guard`` (a pretrained backbone),
    ``alphas`` (None: no interpolation), ``anchor`` (L2-SP strength)."""
    pretrained = bool((cfg.pretrained or cfg.weights) and cfg.backbone)
    alphas = parse_interpolate(cfg.interpolate)
    if str(cfg.interpolate).lower() == "auto" and not pretrained:
        alphas = None
    guard = bool(cfg.guard and pretrained and hasattr(model, "init_identity"))
    return {"guard": guard, "alphas": alphas, "anchor": float(cfg.anchor_weights)}


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def begin(trainer, fresh: bool) -> dict | None:
    """At the start of ``fit``: the starting weights (and the untrained candidate), written to
    RUN/start.safetensors (RUN/untrained.safetensors) by a fresh run, read back on resume;
    the untrained features are scored on validation first and logged. None: nothing to do."""
    from ..rundir.files import load_weights, save_weights

    what = active(trainer.cfg, trainer.model)
    if not (what["guard"] or what["alphas"] or what["anchor"]):
        return None
    model, run_dir = trainer.model, trainer.run_dir
    state = {**what, "start": None, "untrained": None, "untrained_score": None}
    if not fresh:
        if (run_dir / START_FILE).exists():
            state["start"] = load_weights(run_dir / START_FILE)
        if (run_dir / UNTRAINED_FILE).exists():
            state["untrained"] = load_weights(run_dir / UNTRAINED_FILE)
        return state
    state["start"] = _snapshot(model)
    has_val = trainer.val_set is not None and len(trainer.val_set) > 0
    if what["guard"] and trainer.is_main and has_val:
        features = trainer.features.fit_set(model) if trainer.features is not None else None
        if model.init_identity(features):
            state["untrained"] = _snapshot(model)
            state["untrained_score"] = trainer.validation_score()
            if state["untrained_score"] is not None:
                trainer.log(
                    f"guard: the untrained backbone's features (no head) score "
                    f"{trainer.evaluator.selection_metric} {state['untrained_score']:.4f} on "
                    "validation"
                )
        model.load_state_dict(state["start"])
    if trainer.is_main:
        save_weights(run_dir / START_FILE, state["start"])
        if state["untrained"] is not None:
            save_weights(run_dir / UNTRAINED_FILE, state["untrained"])
    return state


def finish(trainer, state: dict | None) -> dict | None:
    """After the last step: score the candidates (:func:`candidates`: the trained model is
    the best validation step's, RUN/model.safetensors) on validation, keep the best in
    ``trainer.model`` and model.safetensors, say which in one line; returns the record for
    eval.json (None: nothing to choose)."""
    from ..rundir.files import load_weights, save_weights

    if state is None or state["start"] is None:
        return None
    model, path = trainer.model, trainer.run_dir / "model.safetensors"
    trained = load_weights(path) if path.exists() else _snapshot(model)
    alphas = state["alphas"]
    metric = trainer.evaluator.selection_metric
    if trainer.val_set is None or len(trainer.val_set) == 0:
        if alphas is None or len(alphas) != 1:
            trainer.log("guard: no validation split, so the trained model is kept unchecked")
            return {"kept": "trained", "reason": "no validation split"}
        pool = dict(candidates(state["start"], trained, None, alphas))
        name = (
            "start" if alphas[0] == 0 else "trained" if alphas[0] == 1 else f"alpha={alphas[0]:g}"
        )
        chosen = Pick(name, None, {})
    else:
        pool = dict(candidates(state["start"], trained, state["untrained"], alphas))
        if alphas is not None and len(alphas) == 1:  # a given alpha: that one (guard aside)
            keep = _alpha_name(alphas[0])
            pool = {k: v for k, v in pool.items() if k in (keep, "untrained")}
        scored = []
        for name, weights in pool.items():
            if name == "untrained" and state.get("untrained_score") is not None:
                scored.append((name, state["untrained_score"]))
                continue
            model.load_state_dict(weights)
            scored.append((name, trainer.validation_score()))
        chosen = pick(scored)
    model.load_state_dict(pool[chosen.name])
    if trainer.is_main:
        save_weights(path, model.state_dict())
    alpha = (
        0.0 if chosen.name == "start" else 1.0 if chosen.name == "trained"
        else float(chosen.name.split("=")[1]) if chosen.name.startswith("alpha=") else None
    )  # fmt: skip
    if chosen.scores:
        if chosen.name == "untrained":
            trainer.log(
                f"guard: keeping the untrained backbone's features - neither the whitened head "
                f"nor training beat them on validation {metric} ({_fmt(chosen.scores)})"
            )
        else:
            trainer.log(f"kept: {chosen.name} on validation {metric} ({_fmt(chosen.scores)})")
    return {"kept": chosen.name, "alpha": alpha, "metric": metric, "val_scores": chosen.scores}
