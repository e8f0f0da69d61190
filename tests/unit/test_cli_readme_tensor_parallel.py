"""The README's tensor-parallel commands split the model they serve over their ranks."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from molink.cli.main import build_parser, parse_engine_args
from molink.models.parallel.check import check_tensor_parallel
from molink.weights import resolve_model_source

README = Path(__file__).resolve().parents[2] / "README.md"


def tensor_parallel_commands() -> list[list[str]]:
    """Every ``molink serve`` line of the README with ``--tensor-parallel-size``."""
    text = re.sub(r"\\\n\s*", " ", README.read_text())
    commands = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("molink serve ") and "--tensor-parallel-size" in line:
            commands.append(shlex.split(line)[1:])
    return commands


def test_the_readme_shows_tensor_parallel_commands() -> None:
    assert tensor_parallel_commands()


def test_each_tensor_parallel_command_splits_its_model() -> None:
    parser = build_parser()
    for argv in tensor_parallel_commands():
        namespace = parser.parse_args(argv)
        args = parse_engine_args(namespace.flag_parser, namespace)
        if args.model is None:  # the default model: its config is here
            config = resolve_model_source(None).model_config
            check_tensor_parallel(config, args.tensor_parallel_size)
        else:
            # A hub id needs the network; its head counts, from its config.json:
            heads = {"Qwen/Qwen3-14B": (40, 8)}[args.model]
            assert all(n % args.tensor_parallel_size == 0 for n in heads), argv
