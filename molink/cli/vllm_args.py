"""vLLM's serving flags, so that a vLLM command line starts this server unchanged: those
that mean something here are honoured, the others are accepted and logged once as having
no effect. Unknown flags still fail, as argparse makes them."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from molink.cli.vllm_api_args import add_api_args, json_object_flag
from molink.cli.vllm_compat_flags import add_compat_flags
from molink.cli.vllm_loading_args import add_loading_args
from molink.config import ENGINE_DEFAULTS
from molink.errors import InvalidParameterError

if TYPE_CHECKING:
    from molink.cli.args import EngineArgs

TOOL_CALL_PARSERS = ("hermes", "llama3_json")


def validate_vllm_flags(args: EngineArgs) -> None:
    if args.tool_call_parser is not None:
        if args.tool_call_parser not in TOOL_CALL_PARSERS:
            raise InvalidParameterError(
                "tool_call_parser", f"must be one of {', '.join(TOOL_CALL_PARSERS)}"
            )
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise InvalidParameterError(
            "enable_auto_tool_choice", "needs --tool-call-parser to read the model's calls"
        )
    if args.override_generation_config is not None:
        override_generation_config(args.override_generation_config)
    if not 0 < args.gpu_memory_utilization <= 1:
        raise InvalidParameterError("gpu_memory_utilization", "must be in (0, 1]")


def override_generation_config(text: str | None) -> dict:
    """--override-generation-config's JSON object ({} when not given)."""
    if text is None:
        return {}
    return json_object_flag("override_generation_config", text, '{"temperature": 0.5}')


def ignored_vllm_flags(args: EngineArgs) -> list[str]:
    """What each vLLM flag given here that means nothing on this server is, one line each."""
    notes = []
    if args.enforce_eager and not _on_gpu(args.device):
        notes.append("--enforce-eager: a CPU stage has no CUDA graphs; it always runs eagerly")
    if args.trust_remote_code:
        notes.append("--trust-remote-code: no model code is ever loaded from a model repo")
    if args.gpu_memory_utilization != ENGINE_DEFAULTS.gpu_memory_utilization and not _on_gpu(
        args.device
    ):
        notes.append(
            "--gpu-memory-utilization: no effect on a CPU stage; --kv-cache-memory sizes the "
            "KV cache there"
        )
    if args.disable_log_requests or args.disable_log_stats:
        notes.append("--disable-log-requests/--disable-log-stats: requests are not logged")
    if args.disable_frontend_multiprocessing:
        notes.append("--disable-frontend-multiprocessing: the frontend is one process")
    if args.enable_chunked_prefill is not None:
        notes.append("--enable-chunked-prefill: long prompts are always prefilled in chunks")
    if args.swap_space is not None:
        notes.append("--swap-space: preempted sequences are recomputed, never swapped")
    if args.uvicorn_log_level is not None:
        notes.append("--uvicorn-log-level: --log-level sets every logger")
    return notes


def _on_gpu(device: str) -> bool:
    import torch  # imported on use: flag parsing alone does not need it

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def add_vllm_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("vLLM compatibility")
    group.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=ENGINE_DEFAULTS.enable_prefix_caching,
        help="reuse the KV cache of shared prompt prefixes (default: "
        f"{'on' if ENGINE_DEFAULTS.enable_prefix_caching else 'off'})",
    )
    group.add_argument(
        "--chat-template",
        default=None,
        help="chat template file (or template text) replacing the model's (default: model's)",
    )
    group.add_argument(
        "--chat-template-content-format",
        default="auto",
        choices=("auto", "string", "openai"),
        help="how message content reaches the chat template: string (text parts joined by "
        "lines), openai (a list of text parts), auto: openai for a template that loops over "
        "the content, else string (default: %(default)s)",
    )
    group.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="let requests send their own chat_template (default: refused)",
    )
    group.add_argument(
        "--generation-config",
        default="auto",
        help="'auto': sampling defaults from the model's generation_config.json; 'vllm': "
        "none; or a folder holding one (default: %(default)s)",
    )
    group.add_argument(
        "--override-generation-config",
        default=None,
        metavar="JSON",
        help="a JSON object laid over the generation config, e.g. "
        '\'{"temperature": 0.5, "max_new_tokens": 256}\' (default: none)',
    )
    group.add_argument(
        "--tool-call-parser",
        default=None,
        choices=TOOL_CALL_PARSERS,
        help="how the model writes tool calls: hermes (Qwen, Hermes) or llama3_json "
        "(default: none)",
    )
    group.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="let the model decide to call tools (tool_choice 'auto'); needs "
        "--tool-call-parser (default: off)",
    )
    group.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=ENGINE_DEFAULTS.gpu_memory_utilization,
        help="share of the GPU's memory this stage may use: the KV cache gets what the "
        "weights and a profiled forward at the largest batch leave; no effect on a CPU "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run decode steps eagerly on a GPU instead of replaying CUDA graphs captured "
        "per batch size at start (default: off)",
    )
    for flag, help_text in (
        ("--trust-remote-code", "accepted; no model code is ever loaded"),
        ("--disable-log-requests", "accepted; requests are not logged"),
        ("--disable-log-stats", "accepted"),
        ("--disable-frontend-multiprocessing", "accepted; the frontend is one process"),
    ):
        group.add_argument(flag, action="store_true", help=f"{help_text} (default: off)")
    group.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="accepted; long prompts are always prefilled in chunks (default: on)",
    )
    group.add_argument(
        "--swap-space", type=float, default=None, help="accepted; no effect (default: none)"
    )
    group.add_argument(
        "--uvicorn-log-level", default=None, help="accepted; see --log-level (default: none)"
    )
    add_loading_args(group)
    add_api_args(group)
    add_compat_flags(parser.add_argument_group("vLLM flags for features this server lacks"))
