"""``python -m molinkv1.entrypoints.api_server``: vLLM's simple API (/generate) and the rest.

Kept for the commands in the MoLink README; it serves the same app as ``molink serve``
(/generate, /tokenize, /detokenize, the OpenAI routes, /health, /metrics).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from molink.cli.args import add_engine_args
from molink.cli.main import parse_engine_args

# The MoLink README starts its OpenAI server with no --port and calls it on 8080.
SEED_DEFAULT_PORT = 8080


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="MoLink API server (vLLM- and OpenAI-compatible)."
    )
    add_engine_args(parser)
    parser.set_defaults(port=SEED_DEFAULT_PORT)
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "molinkv1.entrypoints.api_server") -> int:
    parser = build_parser(prog)
    args = parse_engine_args(parser, parser.parse_args(argv))
    from molink.cli.serve import run_server

    return run_server(args)


if __name__ == "__main__":
    sys.exit(main())
