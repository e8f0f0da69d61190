"""vLLM flags that name features this server does not have, so that a vLLM command line
still starts it, or stops it with the reason.

Each flag is either accepted with a logged note (it cannot change what a request gets:
how vLLM lays out its own processes, kernels or memory), or refused naming the value
(accepting it would serve something other than what was asked for: LoRA adapters,
overridden model configs, embeddings). A value that asks for nothing (``-dp 1``, ``--task
generate``) passes without a word.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from molink.errors import InvalidParameterError


@dataclass(frozen=True)
class CompatFlag:
    flag: str
    takes: str  # "switch" (no value), "value" or "values" (one or more)
    note: str  # why it changes nothing (accepted), or why it is refused
    refused: bool = False
    neutral: tuple[str, ...] = ()  # values that ask for nothing
    short: str | None = None

    @property
    def name(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")


_NO_OUTPUT_CHANGE = "no effect on what a request gets here"
COMPAT_FLAGS = (
    CompatFlag(
        "--data-parallel-size",
        "value",
        "replicas are separate servers (or pipelines) here; only 1",
        refused=True,
        neutral=("1",),
        short="-dp",
    ),
    CompatFlag(
        "--task",
        "value",
        "only text generation is served",
        refused=True,
        neutral=("auto", "generate"),
    ),
    CompatFlag(
        "--runner",
        "value",
        "only text generation is served",
        refused=True,
        neutral=("auto", "generate"),
    ),
    CompatFlag("--enable-lora", "switch", "LoRA adapters are not supported", refused=True),
    CompatFlag("--lora-modules", "values", "LoRA adapters are not supported", refused=True),
    CompatFlag(
        "--hf-overrides",
        "value",
        "the model's config.json is used as it is; edit a copy of the model folder instead",
        refused=True,
    ),
    CompatFlag(
        "--disable-sliding-window",
        "switch",
        "attention keeps the model's sliding window",
        refused=True,
    ),
    CompatFlag(
        "--tool-parser-plugin",
        "value",
        "no parser code is loaded from files; --tool-call-parser names a built-in one",
        refused=True,
    ),
    CompatFlag("--middleware", "values", "no middleware code is loaded from modules", refused=True),
    CompatFlag(
        "--distributed-executor-backend",
        "value",
        "tensor-parallel ranks are processes of this machine",
    ),
    CompatFlag(
        "--disable-custom-all-reduce", "switch", "tensor-parallel ranks sum with NCCL or gloo"
    ),
    CompatFlag("--max-parallel-loading-workers", "value", "each stage loads its own slice"),
    CompatFlag("--cpu-offload-gb", "value", "weights stay on the stage's device"),
    CompatFlag(
        "--speculative-config",
        "value",
        "no speculative decoding: every token comes from the model itself",
    ),
    CompatFlag(
        "--compilation-config", "value", "decode steps use CUDA graphs or run eagerly", short="-O"
    ),
    CompatFlag("--limit-mm-per-prompt", "value", "text-only: media parts are refused"),
    CompatFlag("--allowed-local-media-path", "value", "text-only: media parts are refused"),
    CompatFlag("--code-revision", "value", "no model code is ever loaded"),
    CompatFlag("--max-num-partial-prefills", "value", f"scheduling only; {_NO_OUTPUT_CHANGE}"),
    CompatFlag("--max-long-partial-prefills", "value", f"scheduling only; {_NO_OUTPUT_CHANGE}"),
    CompatFlag("--long-prefill-token-threshold", "value", f"scheduling only; {_NO_OUTPUT_CHANGE}"),
    CompatFlag(
        "--enable-prompt-tokens-details",
        "switch",
        "usage has no prompt_tokens_details: cached tokens are not counted per request",
        refused=True,
    ),
    CompatFlag(
        "--scheduling-policy",
        "value",
        "requests are served first come, first served",
        refused=True,
        neutral=("fcfs",),
    ),
    CompatFlag(
        "--quantization-param-path",
        "value",
        "KV-cache scaling factors are not read from files",
        refused=True,
    ),
    CompatFlag("--preemption-mode", "value", "preempted sequences are always recomputed"),
    CompatFlag("--num-scheduler-steps", "value", f"scheduling only; {_NO_OUTPUT_CHANGE}"),
    CompatFlag("--enable-expert-parallel", "switch", "experts are split as the layers are"),
    CompatFlag("--disable-async-output-proc", "switch", "outputs are processed as they come"),
    CompatFlag("--use-v2-block-manager", "switch", "there is one block manager"),
    CompatFlag("--tokenizer-pool-size", "value", "tokenizing runs off the event loop already"),
    CompatFlag("--enable-sleep-mode", "switch", "the engine does not sleep"),
    CompatFlag("--enable-server-load-tracking", "switch", "/load always answers"),
    CompatFlag("--otlp-traces-endpoint", "value", "no traces are exported"),
    CompatFlag("--async-scheduling", "switch", f"scheduling only; {_NO_OUTPUT_CHANGE}"),
    CompatFlag(
        "--logprobs-mode",
        "value",
        "logprobs are the raw log-probabilities of the model's logits (vLLM's raw_logprobs), "
        "before temperature, penalties or filters; no other mode is served",
        refused=True,
        neutral=("raw_logprobs",),
    ),
    CompatFlag("--max-log-len", "value", "requests are not logged"),
    CompatFlag("--enable-log-outputs", "switch", "outputs are not logged"),
    CompatFlag("--model-impl", "value", "models run this server's own implementation"),
    CompatFlag("--h11-max-incomplete-event-size", "value", "uvicorn's own h11 limits apply"),
    CompatFlag("--h11-max-header-count", "value", "uvicorn's own h11 limits apply"),
    CompatFlag("--safetensors-load-strategy", "value", "each stage loads its own slice"),
)


def add_compat_flags(group: argparse._ArgumentGroup) -> None:
    for compat in COMPAT_FLAGS:
        names = [compat.flag, compat.short] if compat.short else [compat.flag]
        verb = "refused" if compat.refused else "accepted"
        text = f"{verb}: {compat.note}"
        if compat.takes == "switch":
            group.add_argument(*names, dest=_dest(compat), action="store_true", help=text)
        else:
            nargs = "+" if compat.takes == "values" else None
            group.add_argument(*names, dest=_dest(compat), nargs=nargs, default=None, help=text)


def _dest(compat: CompatFlag) -> str:
    return f"compat_{compat.name}"


def compat_values(namespace: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """(flag, value) of each such flag given with a value that asks for something."""
    given = []
    for compat in COMPAT_FLAGS:
        value: Any = getattr(namespace, _dest(compat), None)
        if value is None or value is False:
            continue
        text = (
            "on"
            if value is True
            else " ".join(map(str, value if isinstance(value, list) else [value]))
        )
        if text not in compat.neutral:
            given.append((compat.flag, text))
    return tuple(given)


def validate_compat_flags(given: tuple[tuple[str, str], ...]) -> None:
    by_flag = {compat.flag: compat for compat in COMPAT_FLAGS}
    for flag, value in given:
        compat = by_flag[flag]
        if compat.refused:
            raise InvalidParameterError(compat.name, f"{value!r} is not supported: {compat.note}")


def compat_notes(given: tuple[tuple[str, str], ...]) -> list[str]:
    by_flag = {compat.flag: compat for compat in COMPAT_FLAGS}
    return [f"{flag}: {by_flag[flag].note}" for flag, _ in given if not by_flag[flag].refused]
