"""``tripletlab tune``: hyperparameter search on validation classes (:mod:`~.train.tune`)."""

from __future__ import annotations

import shlex
import sys

from ._base import print_json, register_command


@register_command("tune")
def _add_tune(sub) -> None:
    p = sub.add_parser(
        "tune",
        help="hyperparameter search on validation classes (Optuna)",
        description="Search training options (strategy, margin, lr, weight decay, P, K, "
        "embedding size, augmentation strength, steps, model width) with Optuna's TPE sampler "
        "and median pruning; the objective is the mean validation MAP@R over folds of "
        "held-out training classes. The test split is never evaluated. Writes study.db, "
        "trials.csv/.md, best_recipe.json and tune_report.html in --out.",
    )
    p.add_argument(
        "--data", action="append", default=None,
        help="data set (as for train; repeat it for several image sources)",
    )  # fmt: skip
    p.add_argument(
        "--val-data", action="append", default=None, metavar="FOLDER",
        help="score trials on this labelled source too (repeatable; as for train)",
    )  # fmt: skip
    p.add_argument(
        "--val-mode", choices=["both", "only"], default=None,
        help="with --val-data: both (default) = also the held-out folds; only = it alone",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="base recipe or config file (its test split)")
    p.add_argument("--out", required=True, help="tune directory (study.db lives here)")
    p.add_argument("--space", default=None, help="JSON file overriding the default space")
    p.add_argument("--trials", type=int, default=None, help="trial budget (default 10)")
    p.add_argument("--timeout", type=float, default=None, help="time budget in seconds")
    p.add_argument("--folds", type=int, default=2, help="validation folds over class groups")
    p.add_argument(
        "--val-group-depth", type=int, default=0, help="group classes by N folder levels"
    )
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per trial")
    p.add_argument("--resume", action="store_true", help="continue the study in --out")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_cmd_tune)


def _cmd_tune(args) -> int:
    from ..train.config import load_config_file
    from ..train.tune import tune

    base = load_config_file(args.config) if args.config else {}
    if args.threads:
        base["threads"] = args.threads
    if args.val_data:
        base["val_data"] = args.val_data
    if args.val_mode:
        base["val_mode"] = args.val_mode
    data = args.data or ["digits"]
    n_trials = args.trials if args.trials is not None else (None if args.timeout else 10)
    summary = tune(
        data[0] if len(data) == 1 else data,
        out=args.out,
        base=base,
        space=args.space,
        n_trials=n_trials,
        timeout_s=args.timeout,
        folds=args.folds,
        group_depth=args.val_group_depth,
        seed=args.seed,
        resume=args.resume,
        command="tripletlab " + shlex.join(sys.argv[1:] if sys.argv[1:2] == ["tune"] else ["tune"]),
        log=lambda msg: print(msg, file=sys.stderr),
    )
    if args.json:
        print_json(summary)
    elif "best_value" in summary:
        print(
            f"best mean validation MAP@R {summary['best_value']:.4f} (trial "
            f"{summary['best_trial']}, {summary['trials_complete']} complete, "
            f"{summary['trials_pruned']} pruned, {summary['wall_time_s']}s)\n"
            f"recipe: {args.out}/best_recipe.json  report: {args.out}/tune_report.html"
        )
    else:
        print(f"no trial completed; see {args.out}/trials.md")
    return 0
