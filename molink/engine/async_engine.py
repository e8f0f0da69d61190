"""An asyncio front for LLMEngine: the engine loop runs in its own thread, the HTTP layer
awaits per-request queues. Implements molink/engine/protocol.py's EngineClient."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass

from molink.engine.llm_engine import LLMEngine
from molink.engine.protocol import EngineStats
from molink.errors import ContextLengthExceededError, InvalidParameterError, MolinkError
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.scheduler.validation import check_prompt_token_ids
from molink.tokenizer.protocol import TokenizerLike

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05
_POLL_S = 0.002
# With a slot free but nothing schedulable, only a result or a new request changes that;
# polling faster would only take the GIL from the compute thread of this process.
_BLOCKED_POLL_S = 0.01
_MAINTENANCE_INTERVAL_S = 0.05


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sink: _Sink


@dataclass(frozen=True)
class _Sink:
    """Where a request's outputs go: a queue read on an event loop. The engine thread hands
    each loop all of a step's outputs in one call, not one wake-up per request."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]

    def __call__(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


def _put_all(deliveries: list[tuple[_Sink, RequestOutput]]) -> None:
    for sink, output in deliveries:
        sink.queue.put_nowait(output)


@dataclass
class _Abort:
    request_id: str


class AsyncLLMEngine:
    def __init__(
        self,
        engine: LLMEngine,
        model_name: str,
        max_model_len: int,
        readiness: Callable[[], str | None] | None = None,
        maintenance: Callable[[], list[RequestOutput]] | None = None,
        metric_lines: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer: TokenizerLike = engine.tokenizer
        self._readiness = readiness or engine.executor.readiness
        # Called before every step on the engine thread (e.g. to follow pipeline changes).
        self._maintenance = maintenance
        self._next_maintenance = 0.0
        # Extra Prometheus lines, e.g. the pipeline's link and stage estimates.
        self._metric_lines = metric_lines
        self._commands: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._sinks: dict[str, _Sink] = {}
        self._stats = EngineStats(0, 0, 0, 0)
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="molink-engine", daemon=True)
        self._thread.start()

    # -- EngineClient -------------------------------------------------------------------

    def readiness(self) -> str | None:
        if self._stopped:
            return "the engine is shutting down"
        return self._readiness()

    def stats(self) -> EngineStats:
        return self._stats

    def metric_lines(self) -> list[str]:
        """Lines the server appends to /metrics (none without a source)."""
        return list(self._metric_lines()) if self._metric_lines is not None else []

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        # Tokenizing a long prompt takes a while: never on the event loop.
        prompt_ids = await asyncio.to_thread(self._prompt_ids, prompt)
        self._check_length(prompt_ids, params)
        loop = asyncio.get_running_loop()
        results: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        self._send(_Add(request_id, prompt_ids, params, _Sink(loop, results)))
        finished = False
        try:
            while not finished:
                item = await results.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self._send(_Abort(request_id))

    async def abort(self, request_id: str) -> None:
        self._send(_Abort(request_id))

    def shutdown(self) -> None:
        self._stopped = True
        self._send(None)
        self._thread.join(timeout=10)
        self.engine.executor.close()

    # -- helpers ------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        check_prompt_token_ids(prompt, self.tokenizer.vocab_size)
        return list(prompt)

    def _check_length(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise InvalidParameterError("prompt", "must not be empty")
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthExceededError(len(prompt_ids), self.max_model_len)
        if (
            params.max_tokens is not None
            and len(prompt_ids) + params.max_tokens > self.max_model_len
        ):
            raise ContextLengthExceededError(
                len(prompt_ids) + params.max_tokens, self.max_model_len, "prompt plus max_tokens"
            )

    def _send(self, command: _Add | _Abort | None) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            if not self._drain_commands():
                break
            try:
                self._maybe_maintain()
                outputs = self.engine.step(poll_timeout=self._poll_timeout())
            except Exception as exc:  # keep serving: fail what was running, not the process
                logger.exception("engine step failed")
                outputs = self.engine.fail_all(f"engine error: {exc}")
            self._dispatch(outputs)
            self._update_stats()
            if not self.engine.has_unfinished_requests():
                self._wakeup.wait(_IDLE_WAIT_S)
                self._wakeup.clear()
        for output in self.engine.fail_all("the server is shutting down"):
            self._dispatch([output])

    def _maybe_maintain(self) -> None:
        now = time.monotonic()
        if self._maintenance is None or now < self._next_maintenance:
            return
        self._next_maintenance = now + _MAINTENANCE_INTERVAL_S
        self._dispatch(self._maintenance())

    def _poll_timeout(self) -> float:
        # With every micro-batch slot busy nothing can happen until a result returns, so
        # block longer; with a free slot, come back soon to admit new requests.
        if self.engine.num_in_flight >= self.engine.num_micro_batches:
            return _IDLE_WAIT_S
        if self.engine.nothing_to_schedule and self.engine.num_in_flight:
            return _BLOCKED_POLL_S
        return _POLL_S

    def _drain_commands(self) -> bool:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True
            if command is None:
                return False
            if isinstance(command, _Add):
                self._add(command)
            else:
                output = self.engine.abort_request(command.request_id)
                self._sinks.pop(command.request_id, None)
                if output is not None:
                    logger.info("aborted request %s", command.request_id)

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params)
        except MolinkError as exc:
            command.sink(exc)
            return
        self._sinks[command.request_id] = command.sink

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sink, RequestOutput]]] = {}
        for output in outputs:
            sink = self._sinks.get(output.request_id)
            if sink is None:
                continue
            if output.finished:
                del self._sinks[output.request_id]
            by_loop.setdefault(sink.loop, []).append((sink, output))
        for loop, deliveries in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, deliveries)
            except RuntimeError:  # the loop closed (server shutting down): nobody listens
                logger.debug("dropping %d outputs for a closed event loop", len(deliveries))

    def _update_stats(self) -> None:
        sched = self.engine.scheduler
        self._stats = EngineStats(
            num_running=sched.num_running,
            num_waiting=sched.num_waiting,
            kv_total_blocks=sched.kv.num_total_blocks,
            kv_free_blocks=sched.kv.num_free_blocks,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=sched.prefix_cache_queries,
            prefix_cache_hits=sched.prefix_cache_hits,
        )
