"""``--config FILE`` of ``molink serve`` and ``molink stage``: a YAML mapping of flag names
(``max-model-len`` or ``max_model_len``) to values, as ``vllm serve --config`` reads it.

The file's flags go right after the command (and its MODEL), so that flags written on the
command line come later and win. ``true`` gives a switch, ``false`` leaves it off (or gives
``--no-X`` for a flag that has one), a list gives several values, or its JSON text to a
flag that takes one value (``allowed-origins: ["*"]``), as a mapping does.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_COMMANDS = ("serve", "stage")


def expand_config_file(argv: Sequence[str], flags: argparse.ArgumentParser) -> list[str]:
    """``argv`` with ``--config FILE`` replaced by the file's flags; ``flags`` is a parser
    holding every serving flag (to tell switches from flags that take values)."""
    args = list(argv)
    if not args or args[0] not in CONFIG_COMMANDS:
        return args
    found = [i for i, arg in enumerate(args) if arg == "--config" or arg.startswith("--config=")]
    if not found:
        return args
    if len(found) > 1:
        _fail("--config is given more than once")
    (index,) = found
    if args[index] == "--config":
        if index + 1 >= len(args):
            _fail("--config needs a file")
        path, rest = args[index + 1], args[:index] + args[index + 2 :]
    else:
        path, rest = args[index].partition("=")[2], args[:index] + args[index + 1 :]
    head = 2 if len(rest) > 1 and not rest[1].startswith("-") else 1  # the command, MODEL
    return rest[:head] + config_flags(path, flags) + rest[head:]


def config_flags(path: str, flags: argparse.ArgumentParser) -> list[str]:
    import yaml  # a dependency of transformers; only read when --config is given

    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"--config: cannot read {path}: {exc.strerror or exc}")
    except yaml.YAMLError as exc:
        _fail(f"--config: {path} is not valid YAML: {exc}")
    if not isinstance(values, dict):
        _fail(f"--config: {path} must hold a mapping of flag names to values")
    actions = {option: action for action in flags._actions for option in action.option_strings}
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = actions.get(flag)
        if action is None or flag in ("--config", "--help"):
            _fail(f"--config: {path}: {flag} is not a flag of this command")
        out += _as_args(flag, value, action)
    return out


def _as_args(flag: str, value: Any, action: argparse.Action) -> list[str]:
    if value is None:
        return []
    if isinstance(action, argparse.BooleanOptionalAction):
        return [flag if value else "--no-" + flag[2:]]
    if action.nargs == 0:  # store_true and friends
        return [flag] if value else []
    if isinstance(value, dict) or (isinstance(value, list) and action.nargs is None):
        return [flag, json.dumps(value)]  # a flag that takes JSON (--allowed-origins, ...)
    if isinstance(value, list):
        return [flag, *(str(item) for item in value)]
    return [flag, str(value)]


def _fail(message: str) -> Any:
    argparse.ArgumentParser(prog="molink").error(message)
