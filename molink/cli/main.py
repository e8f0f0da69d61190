"""``molink``: serve a model, serve one pipeline stage, show a pipeline's status, make a
swarm key, or list and prune the on-disk cache."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.config_file import expand_config_file
from molink.cli.security_args import add_swarm_key_args
from molink.errors import InvalidParameterError, MolinkError
from molink.security.swarm_key import SwarmKey, generate_swarm_key, load_swarm_key

logger = logging.getLogger(__name__)


def _add_model_tag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model, as in `vllm serve MODEL` (the same as --model)",
    )


def _add_config_flag(parser: argparse.ArgumentParser) -> None:
    # Read by expand_config_file before parsing; listed here for --help.
    parser.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="a YAML file of flags (max-model-len: 4096, ...) as vllm serve --config takes; "
        "flags on the command line win (default: none)",
    )


def parse_engine_args(parser: argparse.ArgumentParser, namespace: argparse.Namespace) -> EngineArgs:
    """EngineArgs from parsed flags; a bad value exits with status 2 naming its flag."""
    tag = getattr(namespace, "model_tag", None)
    if tag is not None:
        if namespace.model is not None and namespace.model != tag:
            parser.error(f"the model is given twice: {tag} and --model {namespace.model}")
        namespace.model = tag
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
    _add_model_tag(serve)
    _add_config_flag(serve)
    add_engine_args(serve)
    serve.set_defaults(flag_parser=serve)
    stage = commands.add_parser(
        "stage",
        help="serve one stage of a pipeline (serve with --molink-enabled)",
        description="Serve one stage of a distributed pipeline; same flags as serve.",
    )
    _add_model_tag(stage)
    _add_config_flag(stage)
    add_engine_args(stage)
    stage.set_defaults(molink_enabled=True, flag_parser=stage)
    status = commands.add_parser(
        "status",
        help="show a pipeline's stages and the swarm's DHT records: nodes, spans, replicas, "
        "coverage per layer, free KV, throughput, links, age of each record",
        description="Show the pipeline of the peer's head (nodes, layer ranges, capacity, "
        "health, measured links) and the swarm as its DHT holds it (every node's span, "
        "device, memory, free KV, throughput and record age; the coverage of every layer).",
    )
    status.add_argument(
        "--peer", required=True, metavar="HOST:PORT", help="gRPC address of any stage"
    )
    add_swarm_key_args(status)
    keygen = commands.add_parser(
        "keygen",
        help="print a new swarm key for --molink-swarm-key",
        description="Print a new random swarm key. Give the same key to every node of a "
        "swarm (--molink-swarm-key, --molink-swarm-key-file or $MOLINK_SWARM_KEY); keep it "
        "secret: whoever holds it is a member.",
    )
    keygen.add_argument(
        "--output", default=None, metavar="PATH", help="write it to a new file (mode 0600)"
    )
    cache = commands.add_parser(
        "cache",
        help="list the on-disk cache (converted models, packed weights, tokenizers)",
        description="List every cache entry with its size, source file and state: current, "
        "changed (its file has changed since), missing (its file is gone) or superseded (a "
        "newer format of the same file exists). The cache is $MOLINK_CACHE_DIR, else "
        "~/.cache/molink.",
    )
    cache.add_argument(
        "--prune", action="store_true", help="remove every entry that is not current"
    )
    return parser


def _status_formatter() -> Callable[..., str]:
    # Imported on use: the status client pulls in gRPC, which serving flags never need.
    from molink.discovery.status import swarm_status

    return swarm_status


def run_status(peer: str, key: str | None = None, key_file: str | None = None) -> int:
    try:
        format_status = _status_formatter()
    except ImportError as exc:
        sys.stderr.write(f"molink status is unavailable in this installation: {exc}\n")
        return 1
    try:
        swarm_key = load_swarm_key(key, key_file)
    except InvalidParameterError as exc:
        sys.stderr.write(f"--{exc.field.replace('_', '-')}: {exc.message}\n")
        return 2
    try:
        if swarm_key is None:
            report = format_status(peer)
        else:
            report = format_status(peer, status_transport_config(swarm_key))
    except (MolinkError, OSError) as exc:
        sys.stderr.write(f"could not read the pipeline status from {peer}: {exc}\n")
        return 1
    sys.stdout.write(report.rstrip("\n") + "\n")
    return 0


def status_transport_config(key: SwarmKey):
    # Imported on use, as the status formatter: gRPC is not needed by the other commands.
    from molink.security.credentials import SwarmCredentials
    from molink.transport.config import TransportConfig

    return TransportConfig(security=SwarmCredentials.from_key(key))


def run_keygen(output: str | None) -> int:
    text = generate_swarm_key().text() + "\n"
    if output is None:
        sys.stdout.write(text)
        return 0
    try:
        # O_EXCL: never overwrite a key a swarm may already use.
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        sys.stderr.write(f"--output: cannot create {output}: {exc.strerror}\n")
        return 1
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    sys.stderr.write(f"wrote a new swarm key to {output}\n")
    return 0


def run_cache(prune: bool) -> int:
    from molink.weights.cache import default_cache_dir
    from molink.weights.cache_scan import format_entries, prune_cache, scan_cache

    root = default_cache_dir()
    try:
        entries = prune_cache(root) if prune else scan_cache(root)
    except OSError as exc:
        sys.stderr.write(f"cannot read the cache {root}: {exc}\n")
        return 1
    heading = "removed from" if prune else "in"
    sys.stdout.write(f"{heading} {root}:\n{format_entries(entries)}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = expand_config_file(argv, add_engine_args(argparse.ArgumentParser(add_help=False)))
    namespace = parser.parse_args(argv)
    if namespace.command == "status":
        return run_status(
            namespace.peer, namespace.molink_swarm_key, namespace.molink_swarm_key_file
        )
    if namespace.command == "keygen":
        return run_keygen(namespace.output)
    if namespace.command == "cache":
        return run_cache(namespace.prune)
    args = parse_engine_args(namespace.flag_parser, namespace)
    from molink.cli.serve import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
