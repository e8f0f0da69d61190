"""What the HTTP layer needs from an engine, local or pipelined."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Protocol

from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.tokenizer.protocol import TokenizerLike


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_total_blocks: int
    kv_free_blocks: int
    num_preemptions: int = 0  # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, tokens found

    @property
    def kv_usage(self) -> float:
        if self.kv_total_blocks == 0:
            return 0.0
        return 1.0 - self.kv_free_blocks / self.kv_total_blocks


class EngineClient(Protocol):
    model_name: str  # the name clients send as "model"
    max_model_len: int
    tokenizer: TokenizerLike

    def readiness(self) -> str | None:
        """None when requests can be served, otherwise why not (e.g. missing layer ranges)."""

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        """Stream cumulative outputs; the last one has ``finished=True``.

        Raises a MolinkError (e.g. ContextLengthExceededError) before the first output when
        the request cannot be served. Cancelling the iterator aborts the request.
        """

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def metric_lines(self) -> list[str]:
        """Prometheus lines of its own the server appends to /metrics (may be none)."""

    def shutdown(self) -> None:
        """Stops the engine's loop and its stages; the server calls it once, on exit."""
