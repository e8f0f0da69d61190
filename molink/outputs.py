"""What the engine hands to the API layer for each request, streamed or final."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from molink.step import PromptTokenLogprob, TokenLogprob


@dataclass
class CompletionOutput:
    """One of the n sequences of a request. Text and token ids are cumulative."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] | None = None  # of each sampled token, when requested
    top_logprobs: list[list[TokenLogprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that matched
    delta_text: str = ""  # text appended since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    error: str | None = None
    # With an error: the HTTP status it maps to (503: no node serves some layers; None: 500).
    error_status: int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: Sequence[int]  # the scheduler's own tuple: read, never change
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_text: str | None = None
    # With prompt_logprobs: one entry per prompt token after the first, once known.
    prompt_logprobs: list[PromptTokenLogprob] | None = None
    # Node ids, head first, of the route that computed this request's latest tokens (it
    # changes when the request moves to another route); empty in a single process.
    route: tuple[str, ...] = ()
