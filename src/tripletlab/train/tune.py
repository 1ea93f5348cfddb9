"""Hyperparameter search on validation classes: ``tripletlab tune``.

Every trial trains with the options it draws from a declared search space, once per validation
fold (whole classes, or whole folder groups of classes, held out of the training split; see
:func:`tripletlab.data.split_validation`); its objective is the mean over folds of the best
validation MAP@R. The test split of the base configuration stays out of training *and* out of
the search: no trial evaluates it. Optuna's TPE sampler proposes options, a median pruner stops
trials whose validation curve falls below the median of earlier trials at the same validation,
and the study lives in SQLite in the tune directory so ``resume=True`` continues it after a
kill (a trial that was killed is marked failed, not counted, and tried again).

Outputs in ``out``: ``study.db``, ``trials.csv`` and ``trials.md`` (one row per trial),
``best_recipe.json`` (a recipe usable with ``--config``, with the command and budget in its
``_tune`` block), ``tune_report.html`` (optimisation history, parameter importances, table).

Example:
    >>> from tripletlab.train.tune import tune
    >>> res = tune("digits", out="/tmp/tl-tune-doc", n_trials=2, folds=1,
    ...            space={"lr": {"type": "float", "low": 1e-3, "high": 3e-3, "log": True}},
    ...            base={"steps": 20})  # doctest: +SKIP
    >>> res["best_value"]  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import io
import json
import math
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import FileFormatError, InputError, missing_dependency
from ..utils import atomic_write_json, atomic_write_text
from .config import TrainConfig, load_config_file, option_choices, resolve_config

__all__ = ["DEFAULT_SPACE", "check_space", "load_space", "tune"]

#: The declared search space: option -> distribution. ``type`` is ``float`` (``low``, ``high``,
#: optional ``log``), ``int`` (``low``, ``high``, optional ``step``/``log``) or ``categorical``
#: (``choices``). Besides TrainConfig options: ``width`` scales the model's default layer
#: widths, ``augment_strength`` scales a light affine augmentation (0 = none, images only).
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "strategy": {"type": "categorical", "choices": ["semihard", "hard", "all"]},
    "soft_margin": {"type": "categorical", "choices": [False, True]},
    "margin": {"type": "float", "low": 0.05, "high": 0.5},
    "lr": {"type": "float", "low": 2e-4, "high": 5e-3, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "p": {"type": "int", "low": 8, "high": 32, "step": 8},
    "k": {"type": "int", "low": 2, "high": 8, "step": 2},
    "embedding_dim": {"type": "categorical", "choices": [32, 64, 128]},
    "augment_strength": {"type": "float", "low": 0.0, "high": 1.5},
    "steps": {"type": "int", "low": 100, "high": 600, "step": 100},
    "width": {"type": "categorical", "choices": [0.5, 1.0, 2.0]},
}
_EXTRA_PARAMS = ("width", "augment_strength")
_MODEL_PREFIX = "model."  # "model.pool": a key of model_options (see models.MODEL_DEFAULTS)
_N_EVALS = 5  # validations per fold: the pruner's curve
_CNN_CHANNELS = (32, 64, 128, 128)  # models/cnn.py and models/mlp.py defaults
_MLP_HIDDEN = (256, 256)


def check_space(space: dict) -> dict:
    """Check a search space (see :data:`DEFAULT_SPACE`): known options, valid distributions,
    non-empty ranges. Returns it.

    Example:
        >>> check_space({"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})["lr"]
        {'type': 'float', 'low': 0.0001, 'high': 0.01, 'log': True}
    """
    if not isinstance(space, dict) or not space:
        raise InputError("the search space must be a non-empty JSON object: option -> range")
    fields = TrainConfig.__dataclass_fields__
    choices = option_choices()
    for name, dist in space.items():
        if name.startswith(_MODEL_PREFIX):
            from ..models import MODEL_DEFAULTS

            keys = sorted({k for d in MODEL_DEFAULTS.values() for k in d})
            if name[len(_MODEL_PREFIX) :] not in keys:
                raise InputError(
                    f"search space: unknown model option {name!r}; model options are "
                    f"{', '.join(_MODEL_PREFIX + k for k in keys)}"
                )
        elif name not in fields and name not in _EXTRA_PARAMS:
            raise InputError(
                f"search space: unknown option {name!r} (a TrainConfig option, "
                f"{_MODEL_PREFIX}KEY for a model option, or one of {', '.join(_EXTRA_PARAMS)})"
            )
        if not isinstance(dist, dict) or dist.get("type") not in ("float", "int", "categorical"):
            raise InputError(
                f"search space: {name!r} needs {{'type': 'float'|'int'|'categorical', ...}}"
            )
        if dist["type"] == "categorical":
            opts = dist.get("choices")
            if not isinstance(opts, list) or not opts:
                raise InputError(f"search space: {name!r} has an empty list of choices")
            if name in choices and any(c not in choices[name] for c in opts):
                bad = [c for c in opts if c not in choices[name]]
                raise InputError(f"search space: unknown {name} {bad}; choose from {choices[name]}")
            continue
        lo, hi = dist.get("low"), dist.get("high")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
            raise InputError(f"search space: {name!r} needs numeric 'low' and 'high'")
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
            raise InputError(f"search space: {name!r} has an empty range [{lo}, {hi}]")
        if dist.get("log") and lo <= 0:
            raise InputError(f"search space: {name!r} is log-scaled but low = {lo} <= 0")
        if dist["type"] == "int" and (int(lo) != lo or int(hi) != hi):
            raise InputError(f"search space: {name!r} is an int range with non-integer bounds")
    return space


def load_space(path: str | Path | None) -> dict:
    """The default space updated with a JSON space file (an option mapped to ``null`` is
    removed from the search)."""
    space = copy.deepcopy(DEFAULT_SPACE)
    if path is None:
        return check_space(space)
    try:
        over = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise FileFormatError(f"cannot read search space file {path}: {e}") from None
    if not isinstance(over, dict):
        raise FileFormatError(f"search space file {path} must hold a JSON object")
    for k, v in over.items():
        if v is None:
            space.pop(k, None)
        else:
            space[k] = v
    return check_space(space)


def _suggest(trial, space: dict) -> dict:
    params = {}
    for name, d in space.items():
        if d["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, d["choices"])
        elif d["type"] == "int":
            params[name] = trial.suggest_int(
                name, int(d["low"]), int(d["high"]), step=int(d.get("step", 1)),
                log=bool(d.get("log", False)),
            )  # fmt: skip
        else:
            params[name] = trial.suggest_float(
                name, float(d["low"]), float(d["high"]), log=bool(d.get("log", False))
            )
    return params


def _options(params: dict, kind: str, input_dims: int, base_model: dict | None = None) -> dict:
    """Trial parameters -> TrainConfig options (``width`` and ``augment_strength`` expanded).

    ``width`` scales the base recipe's own layer widths (its ``model_options`` ``channels`` /
    ``hidden``, else the model's defaults) and keeps its other model options (pooling, input
    normalisation, dropout, test-time views); ``model.KEY`` sets the model option ``KEY``.

    Example:
        >>> _options({"width": 0.5}, "image", 3, {"channels": [16, 32], "pool": "flatten"})
        {'model_options': {'channels': [8, 16], 'pool': 'flatten'}}
    """
    model_keys = {k: k[len(_MODEL_PREFIX) :] for k in params if k.startswith(_MODEL_PREFIX)}
    out = {k: v for k, v in params.items() if k not in _EXTRA_PARAMS and k not in model_keys}
    mo = copy.deepcopy(base_model or {})
    mo.update({key: params[k] for k, key in model_keys.items()})
    if mo != (base_model or {}) or "width" in params:
        out["model_options"] = mo
    if "width" in params:
        w = float(params["width"])
        if input_dims == 3:
            mo["channels"] = [max(4, round(c * w)) for c in mo.get("channels", _CNN_CHANNELS)]
        else:
            mo["hidden"] = [max(8, round(h * w)) for h in mo.get("hidden", _MLP_HIDDEN)]
    if "augment_strength" in params and kind == "image":
        s = float(params["augment_strength"])
        out["augment"] = (
            "none"
            if s <= 0.05
            else {"affine_degrees": 10.0 * s, "translate": 0.06 * s, "scale": [1 - 0.1 * s, 1]}
        )
    return out


def _base_params(space: dict, cfg: TrainConfig, lr: float, kind: str = "image") -> dict:
    """The base configuration's own values of the searched options (its defaults where unset:
    the lr, the augmentation preset, the model's options), where they lie inside the space
    (``width`` 1, no ``augment_strength``): queued as the first trial.

    Example:
        >>> _base_params({"margin": {"type": "float", "low": 0.1, "high": 0.5},
        ...               "p": {"type": "int", "low": 8, "high": 32, "step": 8}},
        ...              TrainConfig(margin=0.2, p=12), 1e-3)
        {'margin': 0.2}
    """
    out: dict[str, Any] = {}
    for name, d in space.items():
        if name == "augment_strength":
            continue
        if name.startswith(_MODEL_PREFIX):
            from ..models import MODEL_DEFAULTS

            key = name[len(_MODEL_PREFIX) :]
            model = cfg.model or ("cnn" if kind == "image" else "mlp")
            v = cfg.model_options.get(key, MODEL_DEFAULTS.get(model, {}).get(key))
        elif name == "augment" and cfg.augment is None:
            v = "light" if kind == "image" else "none"
        elif name == "embedding_dim" and cfg.embedding_dim is None and not cfg.backbone:
            from .build import DEFAULT_EMBEDDING_DIM

            v = DEFAULT_EMBEDDING_DIM  # what the run would use (a backbone's is automatic)
        else:
            v = 1.0 if name == "width" else lr if name == "lr" else getattr(cfg, name, None)
        if d["type"] == "categorical":
            if any(v == c and type(v) is type(c) for c in d["choices"]):
                out[name] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            step = d.get("step")
            on_grid = d["type"] == "float" or not step or (v - d["low"]) % step == 0
            if d["low"] <= v <= d["high"] and on_grid:
                out[name] = int(v) if d["type"] == "int" else float(v)
    return out


def _data_fingerprint(ds) -> str:
    h = hashlib.sha256()
    h.update(f"{ds.name}|{len(ds)}|{list(ds.input_shape)}|".encode())
    h.update("\n".join(ds.classes).encode())
    return h.hexdigest()[:16]


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.trials:
        secs = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name,
                "value": t.value,
                "seconds": secs,
                **{f"param.{k}": v for k, v in t.params.items()},
            }
        )
    return rows


def _write_tables(out: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())

    def fmt(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    atomic_write_text(out / "trials.md", "\n".join(md) + "\n")


def _write_report(out: Path, study, rows: list[dict], summary: dict) -> None:
    import numpy as np

    from ..report.html import ReportSection, render_html, write_html
    from ..report.plots import subplots

    done = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    figs = {}
    if done:
        fig, ax = subplots(figsize=(7, 3.5))
        n = [r["trial"] for r in done]
        v = [r["value"] for r in done]
        ax.plot(n, v, "o", label="trial (mean validation MAP@R)")
        ax.plot(n, np.maximum.accumulate(v), "-", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation MAP@R")
        ax.legend(loc="lower right")
        figs["optimization_history"] = fig
    try:
        import optuna

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            imp = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError, ImportError):
        imp = {}
    if imp:
        fig, ax = subplots(figsize=(7, 0.4 * len(imp) + 1))
        names = list(imp)[::-1]
        ax.barh(names, [imp[k] for k in names])
        ax.set_xlabel("importance (Optuna default evaluator)")
        fig.tight_layout()
        figs["param_importances"] = fig
    table = [(f"trial {r['trial']} ({r['state']})", r.get("value")) for r in rows]
    sections = [
        ReportSection("Search", figures=figs, tables=[("summary", list(summary.items()))]),
        ReportSection("Trials (mean validation MAP@R over folds)", tables=[("trials", table)]),
    ]
    page = render_html(
        "tripletlab tune",
        summary.get("command") or "tripletlab.train.tune.tune",
        [],
        sections,
        out / "plots",
    )
    write_html(out / "tune_report.html", page)


class TrialPruning:
    """The callback of one fold's training in a trial: after each validation, report the mean
    MAP@R so far (of the folds done and this one's latest) to Optuna and stop the trial when its
    pruner says so (``optuna.TrialPruned`` propagates out of ``fit``)."""

    def __init__(self, trial, fold_scores: list[float], fold: int) -> None:
        self.trial, self.fold_scores, self.fold = trial, fold_scores, fold
        self.n_evals = 0

    def on_validate(self, trainer, step: int, metrics: dict | None) -> None:
        if metrics is None:
            return
        import optuna

        done = self.fold_scores + [metrics["map_at_r"]]
        at = self.fold * _N_EVALS + min(self.n_evals, _N_EVALS - 1)
        self.trial.report(float(sum(done) / len(done)), at)
        self.n_evals += 1
        if self.trial.should_prune():
            raise optuna.TrialPruned()


def _check_budget(n_trials: int | None, timeout_s: float | None, folds: int) -> None:
    if n_trials is None and timeout_s is None:
        raise InputError("give a budget: a number of trials and/or a time limit")
    if n_trials is not None and n_trials < 1:
        raise InputError(f"the trial budget must be >= 1, got {n_trials}")
    if timeout_s is not None and not timeout_s > 0:
        raise InputError(f"the time budget must be > 0 seconds, got {timeout_s}")
    if folds < 1:
        raise InputError(f"folds must be >= 1, got {folds}")


def _probe_data(
    base_values: dict, out: Path, folds: int, group_depth: int
) -> tuple[str, str, int, float]:
    """Load the data set once (checks the folds): its fingerprint, kind, number of input
    dimensions and the base configuration's learning rate."""
    from .trainer import Trainer

    probe = Trainer(
        resolve_config(
            base_values,
            {
                "out": str(out / "_probe"),
                "val_folds": folds,
                "val_fold": 0,
                "val_group_depth": group_depth,
                "quiet": True,
                "report": False,
            },
        ),
        log=lambda *a, **k: None,
    )
    fingerprint = _data_fingerprint(probe.dataset)
    kind, input_dims = probe.train_set.kind, len(probe.train_set.input_shape)
    lr = probe.defaults.lr
    del probe
    shutil.rmtree(out / "_probe", ignore_errors=True)
    return fingerprint, kind, input_dims, lr


def _open_study(optuna, db: Path, *, resume: bool, seed: int, first: dict, log, attrs: dict):
    """The Optuna study in ``db`` (TPE + median pruning): a new one records ``attrs`` and
    queues the base configuration ``first`` as trial 0; a resumed one must have been made on
    the same data, space and folds, and a trial killed mid-run is marked failed and queued
    again."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{db.resolve()}"
    study = optuna.create_study(
        study_name="tripletlab",
        storage=storage,
        load_if_exists=resume,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=_N_EVALS - 1),
    )
    saved = study.user_attrs
    if resume:
        if saved.get("data_fingerprint") != attrs["data_fingerprint"]:
            raise InputError(
                f"the study in {db} was made on another data set ({saved.get('data')!r}, "
                f"fingerprint {saved.get('data_fingerprint')}); tune {attrs['data']!r} in a new "
                "--out"
            )
        if saved.get("space") != attrs["space"] or saved.get("folds") != attrs["folds"]:
            raise InputError(
                f"the study in {db} searched another space or number of folds; start a new --out"
            )
        # a trial killed mid-run stays RUNNING in the database: mark it failed (not counted)
        # and try its parameters again
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, skip_if_exists=False)
            log(f"trial {t.number} was interrupted: marked failed, its parameters queued again")
    else:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
        if first:  # trial 0: the base configuration itself, so the search is measured against it
            study.enqueue_trial(first)
            log(f"trial 0 starts from the base configuration: {first}")
    return study


def _finish(
    study,
    out: Path,
    optuna,
    base_values: dict,
    base_cfg,
    kind: str,
    input_dims: int,
    summary: dict[str, Any],
    seconds: float,
) -> dict:
    """Write the trials table, ``best_recipe.json`` (the base with the best trial's options and
    a ``_tune`` block; it must load back) and the tune report; returns the summary."""
    rows = _trial_rows(study)
    _write_tables(out, rows)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    folds, group_depth = summary["folds"], summary["group_depth"]
    summary = {
        **summary,
        "trials_complete": len(complete),
        "trials_pruned": sum(t.state.name == "PRUNED" for t in study.trials),
        "trials_failed": sum(t.state.name == "FAIL" for t in study.trials),
        "wall_time_s": round(seconds, 1),  # this call
        "trials_time_s": round(sum(r["seconds"] or 0.0 for r in _trial_rows(study)), 1),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if complete:
        best = study.best_trial
        opts = _options(best.params, kind, input_dims, base_cfg.model_options)
        recipe = {
            "_comment": (
                f"made by tripletlab tune on validation classes of the training split only "
                f"({folds} fold(s), group depth {group_depth}); command: {summary['command']}"
            ),
            **{k: v for k, v in base_values.items() if k not in ("data", "threads")},
            **opts,
        }
        recipe.pop("val_fold", None)
        summary.update(
            best_value=best.value,
            best_trial=best.number,
            best_params=best.params,
            best_fold_scores=best.user_attrs.get("fold_scores"),
        )
        recipe["_tune"] = summary
        resolve_config(_strip(recipe))  # the recipe must load back
        atomic_write_json(out / "best_recipe.json", recipe)
    _write_report(out, study, rows, {k: v for k, v in summary.items() if k != "best_params"})
    return summary


def _trial_score(
    trial,
    *,
    space: dict,
    kind: str,
    input_dims: int,
    base_values: dict,
    base_cfg: TrainConfig,
    folds: int,
    group_depth: int,
    out: Path,
) -> float:
    """One trial: train the suggested options on every validation fold (never the test
    split; pruned through :class:`TrialPruning`) and return the mean best validation MAP@R."""
    from .trainer import Trainer

    params = _suggest(trial, space)
    opts = _options(params, kind, input_dims, base_cfg.model_options)
    scores = []
    for f in range(folds):
        steps = opts.get("steps", base_cfg.steps) or base_cfg.steps
        cfg = resolve_config(
            base_values,
            {
                **opts,
                "out": str(out / "trials" / f"{trial.number:04d}" / f"fold{f}"),
                "val_folds": folds,
                "val_fold": f if folds > 1 else 0,
                "val_group_depth": group_depth,
                "eval_every": max(1, math.ceil((steps or 100) / _N_EVALS)) if steps else None,
                "quiet": True,
                "report": False,
                "patience": 0,
            },
        )
        if cfg.val_folds == 1 and cfg.val_fraction == 0 and not cfg.val_data:
            raise InputError("tune needs validation: folds >= 2 or a val_fraction > 0")
        shutil.rmtree(cfg.out, ignore_errors=True)  # a retried trial starts afresh
        pruning = TrialPruning(trial, scores, f)
        trainer = Trainer(cfg, log=lambda *a, **k: None, callbacks=[pruning])
        trainer.evaluate_test = False  # the search never looks at the test split
        trainer.fit()
        best = trainer.state.best
        if not best >= 0:
            raise InputError("no validation score (validation split too small?)")
        scores.append(float(best))
    trial.set_user_attr("fold_scores", scores)
    return float(sum(scores) / len(scores))


def _run_trials(study, objective, n_trials: int | None, timeout_s: float | None, log) -> float:
    """Run trials one at a time until the budget (finished trials, seconds) is spent; returns
    the seconds taken."""
    import optuna

    def counted() -> int:
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        return len(study.get_trials(deepcopy=False, states=states))

    t0 = time.perf_counter()
    while True:
        left = None if n_trials is None else n_trials - counted()
        elapsed = time.perf_counter() - t0
        if (left is not None and left <= 0) or (timeout_s is not None and elapsed >= timeout_s):
            break
        study.optimize(
            objective,
            n_trials=1,
            timeout=None if timeout_s is None else max(1e-3, timeout_s - elapsed),
            catch=(),
        )
        rows = _trial_rows(study)
        last = rows[-1]
        log(
            f"trial {last['trial']}: {last['state'].lower()}"
            + (f", mean validation MAP@R {last['value']:.4f}" if last["value"] is not None else "")
            + f" ({counted()} of {n_trials or '-'} trials, {time.perf_counter() - t0:.0f}s)"
        )
    return time.perf_counter() - t0


def tune(
    data: str = "digits",
    *,
    out: str | Path,
    base: dict | str | None = None,
    space: dict | str | Path | None = None,
    n_trials: int | None = 10,
    timeout_s: float | None = None,
    folds: int = 2,
    group_depth: int = 0,
    seed: int = 0,
    resume: bool = False,
    command: str | None = None,
    log=print,
) -> dict:
    """Search ``space`` with Optuna (TPE + median pruning) on validation folds of ``data``.

    ``base``: a recipe name, config file or dict (its test split is kept out of the search);
    ``n_trials`` / ``timeout_s``: the budget (trials finished in this study, failed ones not
    counted; seconds of this call); ``folds``: validation folds over class groups of
    ``group_depth`` (1 fold: the base's ``val_fraction``). Returns a summary dict (also in
    ``out/best_recipe.json``'s ``_tune`` block).
    """
    try:
        import optuna
    except ImportError:  # pragma: no cover - the [tune] extra
        raise missing_dependency("optuna", "`tripletlab tune`") from None

    _check_budget(n_trials, timeout_s, folds)
    if isinstance(space, (str, Path)):
        space = load_space(space)
    space = check_space(copy.deepcopy(space) if space is not None else copy.deepcopy(DEFAULT_SPACE))
    base_values = (
        load_config_file(base) if isinstance(base, str) else copy.deepcopy(base or {})
    )  # fmt: skip
    base_values.pop("out", None)
    base_values["data"] = data
    base_cfg = resolve_config(base_values)  # checks the base before any training
    if base_cfg.val_data and base_cfg.val_mode == "only" and folds > 1:
        log("tune: --val-mode only scores trials on the --val-data sources alone (1 fold)")
        folds = 1
    out = Path(out)
    db = out / "study.db"
    if db.exists() and not resume:
        raise InputError(f"{out} already holds a study; pass --resume to continue it")
    if resume and not db.exists():
        raise InputError(f"no study to resume in {out} (no study.db)")
    out.mkdir(parents=True, exist_ok=True)

    fingerprint, kind, input_dims, lr = _probe_data(base_values, out, folds, group_depth)
    first = _base_params(space, base_cfg, lr, kind)

    study = _open_study(
        optuna,
        db,
        resume=resume,
        seed=seed,
        first=first,
        log=log,
        attrs={
            "data": data,
            "data_fingerprint": fingerprint,
            "space": space,
            "folds": folds,
            "group_depth": group_depth,
            "base": dict(base_values),
            "command": command,
            "budget": {"n_trials": n_trials, "timeout_s": timeout_s},
        },
    )

    objective = functools.partial(
        _trial_score,
        space=space,
        kind=kind,
        input_dims=input_dims,
        base_values=base_values,
        base_cfg=base_cfg,
        folds=folds,
        group_depth=group_depth,
        out=out,
    )
    seconds = _run_trials(study, objective, n_trials, timeout_s, log)
    return _finish(
        study,
        out,
        optuna,
        base_values,
        base_cfg,
        kind,
        input_dims,
        {
            "command": study.user_attrs.get("command") or command,
            "resumed_with": command if resume else None,
            "data": data,
            "budget": study.user_attrs.get("budget")
            or {"n_trials": n_trials, "timeout_s": timeout_s},
            "resume_budget": {"n_trials": n_trials, "timeout_s": timeout_s} if resume else None,
            "folds": folds,
            "group_depth": group_depth,
        },
        seconds,
    )


def _strip(recipe: dict) -> dict:
    return {k: v for k, v in recipe.items() if not k.startswith("_")}
