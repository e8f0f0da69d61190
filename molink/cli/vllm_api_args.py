"""vLLM's flags about the HTTP API and its outputs (--max-logprobs, --root-path,
--response-role, --guided-decoding-backend, --structured-outputs-config, ...).

Honoured where they mean something here; accepted with a note where they cannot change an
output on this server (a structured-output backend: llguidance enforces every grammar);
refused naming the value where accepting would change what a request gets.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Protocol

from molink.errors import InvalidParameterError
from molink.limits import LIMITS

# vLLM's default for --max-logprobs; -1 (vLLM's "no cap") leaves only the server's bounds.
DEFAULT_MAX_LOGPROBS = 20
GUIDED_DECODING_BACKENDS = (
    "auto",
    "guidance",
    "llguidance",
    "xgrammar",
    "outlines",
    "lm-format-enforcer",
)
# molink.api.reasoning's parsers (not imported: --help never loads the HTTP layer).
REASONING_PARSERS = ("deepseek_r1", "qwen3")
# --structured-outputs-config keys that ask for nothing an llguidance grammar does not do.
_NEUTRAL_STRUCTURED_KEYS = ("backend", "disable_fallback")


class ApiArgs(Protocol):
    max_logprobs: int
    reasoning_parser: str | None
    root_path: str | None
    response_role: str
    guided_decoding_backend: str
    structured_outputs_config: str | None
    max_seq_len_to_capture: int | None
    enable_log_requests: bool
    disable_uvicorn_access_log: bool
    pipeline_parallel_size: int


def validate_api_flags(args: ApiArgs) -> None:
    if not -1 <= args.max_logprobs <= LIMITS.max_logprobs:
        raise InvalidParameterError(
            "max_logprobs",
            f"{args.max_logprobs} must be -1 or in [0, {LIMITS.max_logprobs}]: this server "
            f"returns at most {LIMITS.max_logprobs} alternatives per token (-1: up to that)",
        )
    if args.root_path is not None and not (
        args.root_path.startswith("/") and not args.root_path.endswith("/")
    ):
        raise InvalidParameterError(
            "root_path", f"{args.root_path!r} must start with / and not end with one (e.g. /llm)"
        )
    if not args.response_role:
        raise InvalidParameterError("response_role", "must not be empty")
    structured_outputs_config(args.structured_outputs_config)
    if args.pipeline_parallel_size != 1:
        raise InvalidParameterError(
            "pipeline_parallel_size",
            f"{args.pipeline_parallel_size}: a pipeline is built from nodes, each started "
            "with --molink-enabled and its layers (--molink-start-layer/--molink-end-layer)",
        )


def json_object_flag(field: str, text: str, example: str) -> dict[str, Any]:
    """A flag's JSON object; InvalidParameterError naming ``field`` otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidParameterError(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidParameterError(field, f"must be a JSON object, e.g. {example}")
    return value


def structured_outputs_config(text: str | None) -> dict[str, Any]:
    """--structured-outputs-config's object; keys that would change outputs are refused."""
    if text is None:
        return {}
    value = json_object_flag("structured_outputs_config", text, '{"backend": "xgrammar"}')
    for key, item in value.items():
        if key not in _NEUTRAL_STRUCTURED_KEYS and item not in (None, False, ""):
            raise InvalidParameterError(
                "structured_outputs_config",
                f"{key} is not supported (only {', '.join(_NEUTRAL_STRUCTURED_KEYS)} are)",
            )
    backend = value.get("backend", "auto")
    if backend not in GUIDED_DECODING_BACKENDS:
        raise InvalidParameterError(
            "structured_outputs_config",
            f"backend {backend!r} is not one of {', '.join(GUIDED_DECODING_BACKENDS)}",
        )
    return value


def ignored_api_flags(args: ApiArgs) -> list[str]:
    notes = []
    backend = structured_outputs_config(args.structured_outputs_config).get(
        "backend", args.guided_decoding_backend
    )
    if backend not in ("auto", "guidance", "llguidance"):
        notes.append(
            f"structured-output backend {backend}: every grammar is enforced by llguidance "
            "(the same constraint, exactly)"
        )
    if args.max_seq_len_to_capture is not None:
        notes.append(
            "--max-seq-len-to-capture: decode CUDA graphs cover the whole context "
            "(--max-model-len); no effect"
        )
    if args.enable_log_requests:
        notes.append("--enable-log-requests: requests are not logged")
    return notes


def add_api_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--max-logprobs",
        type=int,
        default=DEFAULT_MAX_LOGPROBS,
        help="most logprobs, top_logprobs or prompt_logprobs a request may ask for; more is "
        f"a 400; -1: up to this server's own bounds ({LIMITS.max_logprobs} alternatives per "
        f"token, {LIMITS.max_prompt_logprobs} per prompt token) (default: %(default)s)",
    )
    group.add_argument(
        "--reasoning-parser",
        default=None,
        choices=REASONING_PARSERS,
        help="split a chat reply's <think>...</think> part into reasoning_content, whole "
        "and streamed: deepseek_r1 (DeepSeek-R1 and its distills) or qwen3 (default: none)",
    )
    group.add_argument(
        "--return-tokens-as-token-ids",
        action="store_true",
        help="logprobs name each token 'token_id:N' unless a request says otherwise (default: off)",
    )
    group.add_argument(
        "--root-path",
        default=None,
        help="the path prefix a proxy serves this API under, e.g. /llm (default: none)",
    )
    group.add_argument(
        "--response-role",
        default="assistant",
        help="the role chat responses carry when add_generation_prompt is true "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--guided-decoding-backend",
        default="auto",
        choices=GUIDED_DECODING_BACKENDS,
        help="accepted; structured output is always enforced by llguidance, which honours "
        "every constraint exactly (default: %(default)s)",
    )
    group.add_argument(
        "--structured-outputs-config",
        default=None,
        metavar="JSON",
        help='accepted with its "backend" (see --guided-decoding-backend); keys that would '
        "change outputs are refused (default: none)",
    )
    group.add_argument(
        "--max-seq-len-to-capture",
        type=int,
        default=None,
        help="accepted; decode CUDA graphs cover the whole context (default: none)",
    )
    group.add_argument(
        "--enable-log-requests",
        action="store_true",
        help="accepted; requests are not logged (default: off)",
    )
    group.add_argument(
        "--disable-uvicorn-access-log",
        action="store_true",
        help="do not log each HTTP request's access line (default: off)",
    )
    group.add_argument(
        "--disable-fastapi-docs",
        action="store_true",
        help="do not serve /docs, /redoc and /openapi.json (default: off)",
    )
    group.add_argument(
        "--enable-request-id-headers",
        action="store_true",
        help="answer every request with an X-Request-Id header: the request's own, else a "
        "new one (default: off)",
    )
    group.add_argument(
        "--enable-force-include-usage",
        action="store_true",
        help="streamed responses end with a usage chunk even when stream_options does not "
        "ask for one (default: off)",
    )
    group.add_argument(
        "--pipeline-parallel-size",
        "-pp",
        type=int,
        default=1,
        help="only 1: a pipeline is built from --molink-enabled nodes (default: %(default)s)",
    )
