"""``tripletlab train``: its flags are generated from :class:`~tripletlab.train.config.TrainConfig`.

Each dataclass field is one flag (``--field-name``, or the ``flag`` in its metadata), with the
field's ``help`` metadata plus its default as help text and the choices of
:func:`~.train.config.option_choices`; bool fields become switches. A flag left out is None
here, so a config file or recipe decides, then the dataclass default.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..train.config import (
    OPTION_GROUPS,
    RECIPES,
    TrainConfig,
    load_config_file,
    option_choices,
    resolve_config,
)
from ._base import print_json, register_command

_SCALARS = {"bool": bool, "int": int, "float": float}


def _cli_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("cli", True)]


def _scalar_type(f: dataclasses.Field) -> type:
    """bool/int/float/str from the annotation (``list[int] | None`` -> int, per item)."""
    ann = str(f.type).split("|")[0].strip()
    if ann.startswith("list["):
        ann = ann[5:-1]
    return _SCALARS.get(ann, str)


def _int_or_word(text: str) -> int | str:
    """An option that takes an integer or a word (``--chunk-size 32`` / ``auto``): the int when
    ``text`` is one, else the text (checked by :func:`~.train.config.resolve_config`)."""
    try:
        return int(text)
    except ValueError:
        return text


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    if f.default not in (None, dataclasses.MISSING) and not isinstance(f.default, bool):
        text += f" (default: {f.default})"
    return text.replace("%", "%%")


def add_config_flags(
    parser, choices: dict[str, list[str]] | None = None, groups: dict | None = None
) -> None:
    """Add one flag per :class:`TrainConfig` field to ``parser`` (defaults None), each in the
    argument group of its field's ``group`` (``groups``: name -> argparse group, created in
    :data:`OPTION_GROUPS` order when not given)."""
    choices = option_choices() if choices is None else choices
    if groups is None:
        groups = option_groups(parser)
    for f in _cli_fields():
        add_field_flag(groups[f.metadata["group"]], f, choices)


def add_field_flag(target, f: dataclasses.Field, choices: dict[str, list[str]]) -> None:
    """The flag of one :class:`TrainConfig` field on ``target`` (a parser or argument group)."""
    flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
    kind = _scalar_type(f)
    if kind is bool:
        action = "store_false" if f.default is True else "store_true"
        target.add_argument(flag, dest=f.name, action=action, default=None, help=_help(f))
        return
    if f.metadata.get("append"):  # repeatable: --data A --data B
        target.add_argument(
            flag, dest=f.name, type=kind, default=None, action="append",
            metavar=f.metadata.get("metavar"), help=_help(f),
        )  # fmt: skip
        return
    target.add_argument(
        flag,
        dest=f.name,
        type=_int_or_word if f.metadata.get("or_word") else kind,
        default=None,
        choices=choices.get(f.name),
        nargs=f.metadata.get("nargs"),
        metavar=f.metadata.get("metavar"),
        help=_help(f),
    )


def option_groups(parser) -> dict:
    """One argparse argument group per :data:`OPTION_GROUPS` entry, in that order (``common``
    first, so ``--help`` starts with the options a newcomer needs)."""
    titles = {"common": "common options"}
    return {g: parser.add_argument_group(titles.get(g, g)) for g in OPTION_GROUPS}


def config_overrides(args) -> dict[str, Any]:
    """The config values given as flags (lists given as one separated string are split; an
    empty list means None: ``--test-classes ""`` clears a config file's list)."""
    out = {}
    for f in _cli_fields():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        sep = f.metadata.get("list_sep")
        if sep:
            value = [c.strip() for c in value.split(sep) if c.strip()] or None
        one = f.metadata.get("append") and not str(f.type).startswith("list")
        if one and isinstance(value, list) and len(value) == 1:
            value = value[0]  # one --data: the plain string, as before
        out[f.name] = value
    if "test_classes" in out:
        out.setdefault("split_by", "class")  # naming held-out classes implies a class split
    return out


#: the ``common`` group of ``tripletlab train --help``, in this order (config fields and the
#: three flags of the command itself)
COMMON_FLAGS = ("data", "config", "out", "steps", "pretrained", "device", "resume", "json")


@register_command("train")
def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train an embedding model (default: on digits)",
        description="Train an embedding model with online triplet mining on PK "
        "batches, validate, evaluate on held-out data, write a run "
        "directory and a report.",
        usage="tripletlab train [--data DATA] [--config FILE_OR_RECIPE] [--out OUT] "
        "[--steps STEPS] [--pretrained] [--device DEVICE] [--resume RUN_DIR] [OPTIONS]",
    )
    groups = option_groups(p)
    choices = option_choices()
    fields = {f.name: f for f in _cli_fields()}
    own = {
        "config": dict(
            dest="config_file",
            default=None,
            metavar="FILE_OR_RECIPE",
            help="JSON file with training options, or a built-in recipe for the real data "
            f"sets: {', '.join(RECIPES)} (flags override it)",
        ),
        "resume": dict(
            dest="resume",
            default=None,
            metavar="RUN_DIR",
            help="continue the run in RUN_DIR from its last complete checkpoint",
        ),
        "json": dict(action="store_true", help="print the final evaluation as JSON"),
    }
    for name in COMMON_FLAGS:
        if name in own:
            groups["common"].add_argument(f"--{name}", **own[name])
        else:
            add_field_flag(groups["common"], fields[name], choices)
    for f in fields.values():
        if f.metadata["group"] != "common":
            add_field_flag(groups[f.metadata["group"]], f, choices)
    p.set_defaults(func=_cmd_train)


def _note(message: str) -> None:
    """Trainer notes (resumed, early stop, ...) go to stderr with the progress; stdout keeps
    the summary (or the JSON of --json)."""
    print(message, file=sys.stderr, flush=True)


def _class_names(ds, limit: int = 12) -> str:
    from ..data.dataset import natural_key

    names = sorted({ds.classes[i] for i in ds.y.unique().tolist()}, key=natural_key)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)})" if len(names) > limit else "")
    return shown


def held_out_line(trainer) -> str | None:
    """Which classes an open-set run holds out (test, and validation where there is one), so a
    user knows which identities the reported figures are about; None for other splits."""
    if getattr(trainer, "test_info", {}).get("by") != "class" or not len(trainer.test_set):
        return None
    line = f"held out for test: {_class_names(trainer.test_set)}"
    if trainer.val_set is not None and len(trainer.val_set):
        line += f"; for validation (model selection, threshold): {_class_names(trainer.val_set)}"
    return line


def _cmd_train(args) -> int:
    from ..data.open import data_sources
    from ..data.text import is_triplet_file
    from ..metrics.evaluate import summary_lines
    from ..rundir.files import read_json
    from ..train.trainer import Trainer
    from ..train.triplet_file import TripletFileTrainer

    def trainer_class(cfg):  # explicit (anchor, positive, negative) texts: nothing to mine
        return (
            TripletFileTrainer
            if isinstance(cfg.data, str) and is_triplet_file(cfg.data)
            else Trainer
        )

    overrides = config_overrides(args)
    if args.resume:
        run = Path(args.resume)
        extra = sorted(
            set(overrides)
            - {"quiet", "report", "progress_every", "steps", "distributed", "dist_timeout"}
        )
        if extra or args.config_file:
            raise UsageError(
                f"--resume continues the saved configuration; drop {extra or ['--config']}"
            )
        saved = read_json(run / "config.json", "run config").get("train", {})
        cfg = resolve_config(saved, {**overrides, "out": str(run)})
        trainer = trainer_class(cfg)(cfg, resume=True, log=_note)
    else:
        file_values = load_config_file(args.config_file) if args.config_file else None
        cfg = resolve_config(file_values, overrides)
        trainer = trainer_class(cfg)(cfg, log=_note)
    if not getattr(trainer, "is_main", True):  # torchrun: rank 0 prints, evaluates, reports
        trainer.fit()
        return 0
    print(
        f"training on {' + '.join(data_sources(cfg.data))}: {len(trainer.train_set)} train / "
        f"{len(trainer.val_set) if trainer.val_set is not None else 0} val / "
        f"{len(trainer.test_set)} test items; strategy={cfg.strategy}, "
        f"{trainer.total_steps} steps -> {trainer.run_dir}"
        + (
            f" ({trainer.dist.world_size} processes, {trainer.dist.backend})"
            if trainer.dist
            else ""
        ),
        file=sys.stderr,
    )
    held = held_out_line(trainer)
    if held:
        print(held, file=sys.stderr)
    result = trainer.fit()
    if cfg.report and cfg.evaluate:
        try:
            from ..report import build_report

            quiet = (lambda _line: None) if cfg.quiet else None  # None: progress on stderr
            result["report"] = str(build_report(trainer.run_dir, log=quiet))
        except Exception as e:  # noqa: BLE001 - a failed report must not lose the run
            print(f"warning: report not written: {e}", file=sys.stderr)
    if args.json:
        print_json(result)
    else:
        print("\n".join(summary_lines(result, trainer.run_dir)))
        if "report" in result:
            print(f"report: {result['report']}")
    return 0
