"""`tripletlab train --help`: the options a newcomer needs come first, every option in a group."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

from tripletlab.cli import main
from tripletlab.cli.train import COMMON_FLAGS
from tripletlab.train.config import OPTION_GROUPS, TrainConfig


def _help() -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["train", "--help"])
    return out.getvalue()


def test_every_config_field_has_a_known_group():
    groups = {f.name: f.metadata.get("group") for f in dataclasses.fields(TrainConfig)}
    assert set(groups.values()) <= set(OPTION_GROUPS)
    assert sorted(n for n, g in groups.items() if g == "common") == sorted(
        ["data", "out", "steps", "pretrained", "device"]
    )


def test_help_starts_with_the_common_group_in_order():
    text = _help()
    sections = re.split(r"\n(?=\S[^\n]*:\n)", text)
    titles = [s.split(":\n", 1)[0].strip() for s in sections[1:]]
    assert titles[:2] == ["options", "common options"]
    assert titles[2:] == [g for g in OPTION_GROUPS if g != "common"]
    common = sections[2]
    flags = re.findall(r"^  (--[a-z-]+)", common, re.M)
    assert flags == [f"--{n}" for n in COMMON_FLAGS]
    # the usage line is short and names the common flags, not all 70
    usage = text.split("\n\n", 1)[0]
    assert len(usage.splitlines()) <= 2 and "--resume RUN_DIR" in usage


def test_every_train_flag_is_still_parsed():
    from tripletlab.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "digits", "--steps", "3", "--p", "4", "--memory-size", "64",
         "--no-eval", "--config", "att_faces", "--resume", "RUN", "--json"]
    )  # fmt: skip
    assert (args.data, args.steps, args.p, args.memory_size) == (["digits"], 3, 4, 64)
    from tripletlab.cli.train import config_overrides

    assert config_overrides(args)["data"] == "digits"  # one --data: the plain string
    assert args.evaluate is False and args.config_file == "att_faces" and args.resume == "RUN"
    assert args.json is True
