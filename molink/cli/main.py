"""``molink``: serve a model, serve one pipeline stage, or show a pipeline's status."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from molink.cli.args import EngineArgs, add_engine_args
from molink.errors import InvalidParameterError, MolinkError

logger = logging.getLogger(__name__)


def parse_engine_args(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags; a bad value exits with status 2 naming its flag."""
    try:
        return EngineArgs.from_namespace(namespace)
    except InvalidParameterError as exc:
        parser.error(f"--{exc.field.replace('_', '-')}: {exc.message}")
        raise  # parser.error exits; this keeps type checkers content


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molink", description="Serve one LLM across machines joined by ordinary networks."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve a model over the OpenAI and vLLM APIs",
        description="Serve a model over the OpenAI and vLLM APIs (alone, or as a pipeline's head).",
    )
    add_engine_args(serve)
    serve.set_defaults(flag_parser=serve)
    stage = commands.add_parser(
        "stage",
        help="serve one stage of a pipeline (serve with --molink-enabled)",
        description="Serve one stage of a distributed pipeline; same flags as serve.",
    )
    add_engine_args(stage)
    stage.set_defaults(molink_enabled=True, flag_parser=stage)
    status = commands.add_parser(
        "status",
        help="show a pipeline's stages: nodes, layer ranges, capacity, health",
        description="Show a pipeline's stages: nodes, layer ranges, capacity, health.",
    )
    status.add_argument(
        "--peer", required=True, metavar="HOST:PORT", help="gRPC address of any stage"
    )
    return parser


def _status_formatter() -> Callable[[str], str]:
    # Imported on use: the status client pulls in gRPC, which serving flags never need.
    module = importlib.import_module("molink.pipeline.status")
    for name in ("format_pipeline_status", "pipeline_status"):
        formatter = getattr(module, name, None)
        if callable(formatter):
            return formatter
    raise ImportError("molink.pipeline.status has no pipeline status formatter")


def run_status(peer: str) -> int:
    try:
        format_status = _status_formatter()
    except ImportError as exc:
        sys.stderr.write(f"molink status is unavailable in this installation: {exc}\n")
        return 1
    try:
        report = format_status(peer)
    except (MolinkError, OSError) as exc:
        sys.stderr.write(f"could not read the pipeline status from {peer}: {exc}\n")
        return 1
    sys.stdout.write(report.rstrip("\n") + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    if namespace.command == "status":
        return run_status(namespace.peer)
    args = parse_engine_args(namespace.flag_parser, namespace)
    from molink.cli.serve import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
