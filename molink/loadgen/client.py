"""Sending one streamed request to an OpenAI-compatible server and timing what comes back.

Times are ``time.perf_counter()`` readings taken as each SSE line is read, so they include
the HTTP stack on both sides: that is what a user of the server sees.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from molink.loadgen.workload import RequestSpec, WorkloadError

logger = logging.getLogger(__name__)

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
}
_DATA_PREFIX = "data:"
_DONE = "[DONE]"
_ERROR_BODY_CHARS = 500


@dataclass
class RequestResult:
    """What happened to one request. Times are seconds; ``send_time`` is from the start of the
    run, the others (``ttft``, ``chunk_times``, ``e2e``) from the request's own send."""

    index: int
    scheduled_time: float
    expected_output_tokens: int
    prompt_length: int | None = None
    send_time: float | None = None
    ttft: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    e2e: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    usage_reported: bool = False
    status_code: int | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (n_out - 1)."""
        if self.ttft is None or self.e2e is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def inter_token_latencies(self) -> list[float]:
        """Gaps between consecutive content chunks (one chunk may carry several tokens)."""
        times = self.chunk_times
        return [later - earlier for earlier, later in zip(times, times[1:], strict=False)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "scheduled_time": self.scheduled_time,
            "send_time": self.send_time,
            "prompt_length": self.prompt_length,
            "prompt_tokens": self.prompt_tokens,
            "expected_output_tokens": self.expected_output_tokens,
            "output_tokens": self.output_tokens,
            "usage_reported": self.usage_reported,
            "ttft": self.ttft,
            "tpot": self.tpot,
            "e2e": self.e2e,
            "chunk_times": self.chunk_times,
            "status_code": self.status_code,
            "error": self.error,
        }


def build_body(
    spec: RequestSpec,
    model: str,
    endpoint: Endpoint,
    temperature: float = 0.0,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON body for one streamed request, asking for usage in the last chunk."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": spec.ignore_eos,
    }
    if endpoint == "completions":
        body["prompt"] = spec.prompt
    elif endpoint == "chat":
        if not isinstance(spec.prompt, str):
            raise WorkloadError("the chat route takes text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        raise WorkloadError(f"unknown endpoint {endpoint!r}; use one of {list(ENDPOINT_PATHS)}")
    body.update(extra_body or {})
    return body


class MalformedChunk(ValueError):
    """A streamed chunk that is JSON but not shaped as the API's chunks are."""


def chunk_content(chunk: dict[str, Any]) -> str:
    """The generated text a chunk carries, for either route ("" for role or usage chunks).
    Raises MalformedChunk for choices that are not a list of objects."""
    choices = chunk.get("choices") or []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise MalformedChunk(f"choices is not a list of objects: {str(choices)[:80]}")
    parts = []
    for choice in choices:
        text = choice.get("text")
        if text is None:
            delta = choice.get("delta") or {}
            text = delta.get("content") if isinstance(delta, dict) else None
        if text:
            parts.append(str(text))
    return "".join(parts)


def sse_payload(line: str) -> str | None:
    """The data of one SSE line, or None for blank lines, comments and other fields."""
    if not line.startswith(_DATA_PREFIX):
        return None
    return line[len(_DATA_PREFIX) :].strip()


async def send_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    result: RequestResult,
    run_start: float,
) -> None:
    """Sends ``body`` and fills ``result`` in as the stream arrives; never raises for a
    failed request (the failure goes into ``result.error``)."""
    started = time.perf_counter()
    result.send_time = started - run_start
    try:
        async with client.stream("POST", path, json=body) as response:
            result.status_code = response.status_code
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:_ERROR_BODY_CHARS]}"
                return
            await _read_stream(response, result, started)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"


async def _read_stream(response: httpx.Response, result: RequestResult, started: float) -> None:
    num_chunks = 0
    async for line in response.aiter_lines():
        payload = sse_payload(line)
        if payload is None:
            continue
        now = time.perf_counter() - started
        if payload == _DONE:
            result.e2e = now
            break
        try:
            chunk = json.loads(payload)
            if not isinstance(chunk, dict):
                raise MalformedChunk("not a JSON object")
            recorded = _record_chunk(chunk, result, now)
        except (json.JSONDecodeError, MalformedChunk) as exc:
            result.error = f"malformed SSE data ({exc}): {payload[:_ERROR_BODY_CHARS]}"
            return
        if recorded:
            num_chunks += 1
        if result.error is not None:
            return
    if result.e2e is None:
        result.error = "stream ended before [DONE]"
        return
    if not result.usage_reported:
        # Without usage, one chunk per token is the best guess (true of most servers).
        result.output_tokens = num_chunks


def _record_chunk(chunk: dict[str, Any], result: RequestResult, now: float) -> bool:
    """Records one decoded chunk; True if it carried generated text."""
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        result.error = f"server error in stream: {message}"
        return False
    usage = chunk.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        result.output_tokens = _count(usage, "completion_tokens")
        prompt_tokens = usage.get("prompt_tokens")
        result.prompt_tokens = None if prompt_tokens is None else _count(usage, "prompt_tokens")
        result.usage_reported = True
    if not chunk_content(chunk):
        return False
    if result.ttft is None:
        result.ttft = now
    result.chunk_times.append(now)
    return True


def _count(usage: dict[str, Any], name: str) -> int:
    value = usage[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedChunk(f"usage {name} is not a token count: {str(value)[:80]}")
    return value
