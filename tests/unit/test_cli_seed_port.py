"""The seed README's OpenAI section: its server command names no port, and its cURL and
SDK calls reach http://localhost:8080, so its entry points listen there by default."""

from __future__ import annotations

import shlex

from molink.cli.main import build_parser, parse_engine_args
from molinkv1.entrypoints import api_server

SEED_OPENAI_SERVER = (
    "--model Qwen/Qwen3-14B --molink-enabled --molink-grpc-port 50061 "
    "--molink-start-layer 0 --molink-end-layer -1"
)
SEED_CLIENT_PORT = 8080  # curl http://localhost:8080/v1/chat/completions; base_url :8080


def test_the_seed_openai_server_listens_where_its_clients_call() -> None:
    parser = api_server.build_parser("molinkv1.entrypoints.openai.api_server")
    args = parse_engine_args(parser, parser.parse_args(shlex.split(SEED_OPENAI_SERVER)))
    assert args.port == SEED_CLIENT_PORT
    assert f"(default: {SEED_CLIENT_PORT})" in parser.format_help()


def test_an_explicit_port_still_wins_and_molink_serve_keeps_8000() -> None:
    parser = api_server.build_parser("api_server")
    args = parse_engine_args(parser, parser.parse_args(["--port", "8000"]))
    assert args.port == 8000
    namespace = build_parser().parse_args(["serve"])
    assert parse_engine_args(namespace.flag_parser, namespace).port == 8000
