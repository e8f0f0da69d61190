"""vLLM's CORS flags: --allowed-origins, --allow-credentials, --allowed-methods,
--allowed-headers (JSON lists, as vLLM takes them). Without --allowed-origins no origin is
allowed (vLLM allows all by default; molink.api.cors says why not here)."""

from __future__ import annotations

import argparse
import json


def json_string_list(text: str) -> tuple[str, ...]:
    """A JSON list of strings, e.g. '["https://ui.example"]' (an argparse type)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a JSON list of strings, e.g. '[\"https://ui.example\"]'"
        )
    return tuple(value)


def add_cors_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cross-origin requests (vLLM's flags)")
    group.add_argument(
        "--allowed-origins",
        type=json_string_list,
        default=(),
        metavar="JSON",
        help="origins whose pages may call the API, e.g. '[\"https://ui.example\"]' or "
        "'[\"*\"]' (default: none; vLLM's is all)",
    )
    group.add_argument(
        "--allow-credentials",
        action="store_true",
        help="let those pages send cookies and credentials (default: off)",
    )
    group.add_argument(
        "--allowed-methods",
        type=json_string_list,
        default=("*",),
        metavar="JSON",
        help="HTTP methods they may use (default: '[\"*\"]')",
    )
    group.add_argument(
        "--allowed-headers",
        type=json_string_list,
        default=("*",),
        metavar="JSON",
        help="request headers they may send (default: '[\"*\"]')",
    )
