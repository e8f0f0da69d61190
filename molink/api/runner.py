"""Running one HTTP request's engine requests: start, merge their streams, abort, shut down.

A request with several prompts becomes several engine requests; their outputs are merged
into one stream in arrival order. Whatever ends a request early (a client that goes away,
an error, a server shutdown) goes through ``GenerationRun.close``, which aborts every engine
request that has not finished so that its KV blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import anyio

from molink.api.errors import APIError
from molink.engine.protocol import EngineClient
from molink.errors import ModelNotReadyError, MolinkError
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass(frozen=True)
class _Shutdown:
    reason: str


_END = object()
_NEW_OUTPUT = object()  # the latest output of that prompt is waiting in GenerationRun._latest


class ServerShuttingDown(APIError):
    def __init__(self, reason: str) -> None:
        super().__init__(503, f"the server is shutting down ({reason})")


class RequestFailedError(MolinkError):
    """The engine ended a request with finish_reason "error" or "abort"."""


class StreamRegistry:
    """The queues of running generations, so that a shutdown can end each one with an error."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue] = set()
        self.closing_reason: str | None = None

    def register(self, queue: asyncio.Queue) -> None:
        if self.closing_reason is not None:
            raise ServerShuttingDown(self.closing_reason)
        self._queues.add(queue)

    def unregister(self, queue: asyncio.Queue) -> None:
        self._queues.discard(queue)

    @property
    def num_active(self) -> int:
        return len(self._queues)

    def close_all(self, reason: str = "stop requested") -> int:
        """Ends every running generation; new ones are refused from now on."""
        self.closing_reason = reason
        for queue in list(self._queues):
            queue.put_nowait(_Shutdown(reason))
        return len(self._queues)


class GenerationRun:
    """The engine requests behind one HTTP request (one per prompt, each with n choices)."""

    def __init__(
        self,
        engine: EngineClient,
        registry: StreamRegistry,
        request_ids: Sequence[str],
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams],
        on_finished: Callable[[RequestOutput], None] | None = None,
        on_aborted: Callable[[int], None] | None = None,
        on_tokens: Callable[[float, int], None] | None = None,
    ) -> None:
        self._engine = engine
        self._registry = registry
        self._request_ids = list(request_ids)
        self._prompts = list(prompts)
        # One for every prompt, or one for all (they differ only in a default max_tokens cut
        # to each prompt's room; n is the same).
        self._params = (
            [params] * len(self._prompts) if isinstance(params, SamplingParams) else list(params)
        )
        self._on_finished = on_finished
        self._on_aborted = on_aborted  # called with the sequences of each request aborted
        # Called with (seconds per token, tokens) for the tokens each output adds after the
        # first: the inter-token latency clients see.
        self._on_tokens = on_tokens
        self._num_tokens: dict[int, int] = {}
        self._last_output_time: dict[int, float] = {}
        self._queue: asyncio.Queue = asyncio.Queue()
        self._latest: dict[int, RequestOutput] = {}
        self._generators: list[AsyncGenerator[RequestOutput, None]] = []
        self._pumps: list[asyncio.Task] = []
        self._finished: set[int] = set()
        # Requests whose sequences the metrics already counted (finished or failed): an
        # abort at close must not count them again.
        self._reported: set[int] = set()
        self._closed = False

    @property
    def request_ids(self) -> list[str]:
        return list(self._request_ids)

    async def start(self) -> list[RequestOutput]:
        """Submits every prompt and waits for each first output.

        The engine reports a request it cannot serve before its first output, so waiting
        here lets such errors become a status code instead of a broken stream.
        """
        self._registry.register(self._queue)
        waiting: list[asyncio.Task] = []
        try:
            self._generators = [
                self._engine.generate(rid, prompt, params)
                for rid, prompt, params in zip(
                    self._request_ids, self._prompts, self._params, strict=True
                )
            ]
            waiting = [asyncio.ensure_future(_first_output(g)) for g in self._generators]
            firsts = await self._first_outputs(waiting)
            for first in firsts:  # no route for it: a status, before any byte is sent
                _raise_if_unavailable(first)
        except BaseException:
            # gather leaves the other first-output waits running: stop them before aborting.
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
            await self.close()
            raise
        for index, first in enumerate(firsts):
            self._pumps.append(asyncio.ensure_future(self._pump(index, first)))
        return firsts

    async def _first_outputs(self, waiting: list[asyncio.Task]) -> list[RequestOutput]:
        """Every first output; a shutdown meanwhile ends the wait (ServerShuttingDown), as it
        ends a running request, instead of leaving it to the graceful timeout."""
        firsts = asyncio.gather(*waiting)
        shutdown = asyncio.ensure_future(self._queue.get())  # nothing else is queued yet
        try:
            await asyncio.wait({firsts, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            firsts.cancel()  # e.g. the client left: the caller aborts the requests
            raise
        finally:
            shutdown.cancel()
        if shutdown.done() and not shutdown.cancelled():
            firsts.cancel()
            await asyncio.gather(firsts, return_exceptions=True)
            raise ServerShuttingDown(shutdown.result().reason)
        return await firsts

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, cumulative output) in arrival order, until every request finished."""
        remaining = set(range(len(self._generators)))
        while remaining:
            item = await self._queue.get()
            if isinstance(item, _Shutdown):
                raise ServerShuttingDown(item.reason)
            index, payload = item
            if payload is _END:
                remaining.discard(index)
                continue
            if isinstance(payload, BaseException):
                raise payload
            output = self._latest.pop(index)
            self._note_output(index, output)
            yield index, output

    async def close(self) -> None:
        """Stops the pumps and aborts every engine request that has not finished."""
        if self._closed:
            return
        self._closed = True
        self._registry.unregister(self._queue)
        # Starlette cancels a streaming response through an anyio cancel scope, which cancels
        # every later await in the task too; shielded, the aborts still reach the engine.
        with anyio.CancelScope(shield=True):
            for pump in self._pumps:
                pump.cancel()
            await asyncio.gather(*self._pumps, return_exceptions=True)
            for index, generator in enumerate(self._generators):
                if index in self._finished:
                    continue
                await _close_generator(generator)
                await self._abort(self._request_ids[index])
                if self._on_aborted is not None and index not in self._reported:
                    self._on_aborted(self._params[index].n)

    async def _pump(self, index: int, first: RequestOutput) -> None:
        try:
            self._deliver(index, first)
            if not first.finished:
                async for output in self._generators[index]:
                    self._deliver(index, output)
                    if output.finished:
                        break
            self._finished.add(index)  # nothing left to abort in the engine
            await _close_generator(self._generators[index])
            self._queue.put_nowait((index, _END))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the consumer, which reports it to the client
            self._queue.put_nowait((index, exc))

    def _deliver(self, index: int, output: RequestOutput) -> None:
        """Outputs are cumulative, so one the consumer has not taken yet is simply replaced.

        A slow client then costs one pending output per prompt, not one per token.
        """
        if index not in self._latest:
            self._queue.put_nowait((index, _NEW_OUTPUT))
        self._latest[index] = output

    def _note_output(self, index: int, output: RequestOutput) -> None:
        if self._on_tokens is not None:
            self._note_tokens(index, output)
        failed = [c for c in output.outputs if c.finish_reason in ("error", "abort")]
        if output.finished or failed:
            self._reported.add(index)
            if self._on_finished is not None:
                self._on_finished(output)
        if failed:
            _raise_if_unavailable(output)
            first = failed[0]
            if first.finish_reason == "abort":
                reason = first.error or "the request was aborted by the engine"
            else:
                reason = first.error or "the engine failed while generating"
            raise RequestFailedError(self._naming_choice(index, first.index, reason))

    def _naming_choice(self, prompt_index: int, choice_index: int, reason: str) -> str:
        """With several choices, which one failed (its index in the answer): as in vLLM the
        whole answer fails, and the others are stopped."""
        n = self._params[prompt_index].n
        if n * len(self._prompts) == 1:
            return reason
        number = prompt_index * n + choice_index
        return f"choice {number} failed ({reason}); the request's other choices were stopped"

    def _note_tokens(self, index: int, output: RequestOutput) -> None:
        assert self._on_tokens is not None
        now = time.monotonic()
        total = max((len(c.token_ids) for c in output.outputs), default=0)
        new = total - self._num_tokens.get(index, 0)
        if new <= 0:
            return
        previous = self._last_output_time.get(index)
        self._num_tokens[index] = total
        self._last_output_time[index] = now
        if previous is not None:
            self._on_tokens((now - previous) / new, new)

    async def _abort(self, request_id: str) -> None:
        try:
            await self._engine.abort(request_id)
        except Exception:
            logger.exception("aborting request %s failed", request_id)


def _raise_if_unavailable(output: RequestOutput) -> None:
    """A request that ended because no node serves some of the layers (503, not 500)."""
    for choice in output.outputs:
        if choice.finish_reason == "error" and choice.error_status == 503:
            raise ModelNotReadyError(choice.error or "some layers are not served by any node")


async def _first_output(generator: AsyncGenerator[RequestOutput, None]) -> RequestOutput:
    try:
        return await generator.__anext__()
    except StopAsyncIteration:
        raise RequestFailedError("the engine ended the request without any output") from None


async def _close_generator(generator: AsyncGenerator[RequestOutput, None]) -> None:
    with contextlib.suppress(Exception):
        await generator.aclose()
