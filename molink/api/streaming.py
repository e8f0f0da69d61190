"""Streaming bodies (server-sent events, vLLM's JSON lines) and client-disconnect handling."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import Response

from molink.api.errors import APIError, error_body, to_api_error
from molink.api.runner import GenerationRun
from molink.errors import MolinkError
from molink.outputs import CompletionOutput, RequestOutput

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
# Not a standard code: nginx's "client closed request"; nobody is left to read it.
CLIENT_CLOSED_STATUS = 499


def json_dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse_event(obj: Any) -> str:
    return f"data: {json_dumps(obj)}\n\n"


@dataclass
class ChoiceDelta:
    text: str
    start_token: int
    end_token: int
    finish_reason: str | None


class ChoiceCursor:
    """How much of one choice a client has been sent, so each chunk carries only what is new.

    Outputs are cumulative; slicing them (rather than trusting per-output deltas) stays right
    even when the engine coalesces several steps into one output.
    """

    def __init__(self) -> None:
        self.sent_chars = 0
        self.sent_tokens = 0
        self.done = False

    def advance(self, output: CompletionOutput) -> ChoiceDelta | None:
        if self.done:
            return None
        text = output.text[self.sent_chars :]
        start, end = self.sent_tokens, len(output.token_ids)
        finish = output.finish_reason
        if not text and end == start and finish is None:
            return None
        self.sent_chars = max(self.sent_chars, len(output.text))
        self.sent_tokens = max(start, end)
        self.done = finish is not None
        return ChoiceDelta(text, start, max(start, end), finish)


class StreamFormatter(Protocol):
    def on_start(self, firsts: list[RequestOutput]) -> list[dict]: ...

    def on_output(self, index: int, output: RequestOutput) -> list[dict]: ...

    def on_end(self) -> list[dict]: ...


@dataclass(frozen=True)
class Framing:
    """How chunks are written: SSE with a closing [DONE], or vLLM's JSON lines."""

    encode: Callable[[Any], str]
    done: str | None
    media_type: str


SSE = Framing(encode=sse_event, done=SSE_DONE, media_type="text/event-stream")
JSON_LINES = Framing(
    encode=lambda obj: json_dumps(obj) + "\n", done=None, media_type="application/x-ndjson"
)


async def stream_body(
    run: GenerationRun,
    firsts: list[RequestOutput],
    formatter: StreamFormatter,
    framing: Framing,
) -> AsyncIterator[str]:
    """The body of a streamed response. A failure becomes an error event, then [DONE]."""
    try:
        for chunk in formatter.on_start(firsts):
            yield framing.encode(chunk)
        async for index, output in run.outputs():
            for chunk in formatter.on_output(index, output):
                yield framing.encode(chunk)
        for chunk in formatter.on_end():
            yield framing.encode(chunk)
    except Exception as exc:
        error = to_api_error(exc)
        if isinstance(exc, (APIError, MolinkError)):
            logger.warning("stream %s ended with an error: %s", run.request_ids[0], error.message)
        else:
            logger.exception("stream %s failed unexpectedly", run.request_ids[0])
        yield framing.encode(error_body(error.status, error.message, error.param, error.code))
    finally:
        # Also reached when the client goes away (the task is cancelled): free the KV blocks.
        await run.close()
    if framing.done is not None:
        yield framing.done


async def collect_final(run: GenerationRun, firsts: list[RequestOutput]) -> list[RequestOutput]:
    """The last output of every prompt of a non-streamed request."""
    finals = list(firsts)
    async for index, output in run.outputs():
        finals[index] = output
    return finals


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(request: Request, work: Callable[[], Awaitable[T]]) -> T | Response:
    """Runs a non-streamed handler, cancelling it (so its requests abort) if the client leaves."""
    task = asyncio.ensure_future(work())
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _cancel_and_wait(task)
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    await _cancel_and_wait(task)
    logger.info("client disconnected; its request was cancelled")
    return Response(status_code=CLIENT_CLOSED_STATUS)


async def _cancel_and_wait(task: asyncio.Future) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
