"""The head's record of each sequence and request, and what ``update`` reports back.

Who owns which piece of a sequence's state on the head (one owner each; the others read):

* tokens (prompt + outputs): its ``Sequence`` here, the one list of them. The scheduler
  appends each sampled token; plans, preemption and failover replay send the tokens from
  it; the engine's ``RequestState`` reads them through ``SequenceTokens`` and copies them
  only into the outputs it hands to the API, so what a client streamed is exactly what a
  replay sends again. The prompt is kept once per request (``RequestRecord``).
* plans in flight: the scheduler's ``InFlightPlans`` (molink/scheduler/in_flight.py); the
  engine loop reads it. The pipeline head keeps per step id only how the step travels
  (route, deadlines: ``Flight`` in molink/pipeline/head_flights.py); spot checks get each
  plan as it is submitted and keep only their mirrored copies until the comparison.
* KV blocks: each node's own ``KVCacheManager``: the head's for its own layers (keyed by
  sequence id; the scheduler's scheduling pass allocates, its ``SequenceLifecycle`` frees),
  a stage's keyed by (head id, sequence id). No block id travels between nodes.
* queues (waiting, running, held siblings), request records, the replay queue and tokens
  awaiting a spot check's verdict: the scheduler's ``SequenceLifecycle``
  (molink/scheduler/lifecycle.py); the rest of the scheduler reads them.
* route: the head's ``RouteBook`` (molink/pipeline/route_book.py), from a sequence's first
  plan until it is released, preempted or replayed.
* text, logprobs, finish reason, timings: the engine's ``RequestState``.
* sampling history (penalties): the last stage's own state, rebuilt from the tokens it is
  sent (``NewSequenceData``) and extended by what it samples; it is the stage's, not the
  head's, even when both run in one process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

from molink.sampling_params import SamplingParams
from molink.step import SampledToken, TokenLogprob

_MASK_64 = (1 << 64) - 1
_MASK_63 = (1 << 63) - 1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class SequenceTokens(Protocol):
    """Read access to one sequence's tokens, for code outside the scheduler (no copies
    are kept elsewhere; the lists returned are fresh slices)."""

    @property
    def seq_id(self) -> int: ...

    @property
    def prompt_token_ids(self) -> tuple[int, ...]: ...

    @property
    def num_output_tokens(self) -> int: ...

    def output_tokens_from(self, start: int) -> list[int]: ...


class Sequence:
    """One of a request's n sequences: its tokens and how far the KV cache has caught up.

    ``num_computed_tokens`` counts tokens whose KV every stage holds; the scheduler gives
    the sequence new tokens until it reaches ``num_tokens``. The engine may read these
    fields; only the scheduler changes them.
    """

    __slots__ = (
        "seq_id",
        "request",
        "seq_index",
        "params",
        "token_ids",
        "num_prompt_tokens",
        "max_output_tokens",
        "arrival_order",
        "num_computed_tokens",
        "status",
        "finish_reason",
        "stop_reason",
        "in_flight_step",
        "known_to_stages",
        "num_blocks_sent",
        "is_released",
        "replay_pending",
        "num_replays",
        "num_room_refusals",
        "sent_in_step",
    )

    def __init__(
        self,
        seq_id: int,
        request: RequestRecord,
        seq_index: int,
        params: SamplingParams,
        prompt_token_ids: list[int],
        max_output_tokens: int,
        arrival_order: int,
    ) -> None:
        self.seq_id = seq_id
        self.request = request
        self.seq_index = seq_index
        self.params = params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.max_output_tokens = max_output_tokens
        self.arrival_order = arrival_order  # FCFS rank; preemption picks the highest
        self.num_computed_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.in_flight_step: int | None = None  # step id of the plan holding it
        self.known_to_stages = False  # stages hold its NewSequenceData
        self.num_blocks_sent = 0  # block-table entries the stages already hold
        self.is_released = False  # finished and its blocks freed for good
        self.replay_pending = False  # its KV was lost while in flight: replay on return
        self.num_replays = 0  # times it was moved to another route after a failure
        self.num_room_refusals = 0  # room refusals (KV_FULL) of its plans since its last token
        self.sent_in_step: int | None = None  # the step that sent the stages' current copy

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.request.prompt_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    def output_tokens_from(self, start: int) -> list[int]:
        """Output tokens ``start`` onwards (0: all of them)."""
        return self.token_ids[self.num_prompt_tokens + start :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def is_in_flight(self) -> bool:
        return self.in_flight_step is not None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, {self.status.value}, "
            f"computed={self.num_computed_tokens}/{self.num_tokens})"
        )


@dataclass(eq=False)
class RequestRecord:
    """A request's sequences. Siblings (index > 0) may be held back until the first
    sequence's prompt is in the prefix cache, so that they share its blocks."""

    request_id: str
    params: SamplingParams
    arrival_time: float | None
    prompt_token_ids: tuple[int, ...]
    sequences: list[Sequence] = field(default_factory=list)
    held_siblings: list[Sequence] = field(default_factory=list)
    num_released: int = 0  # sequences whose blocks are freed for good

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None,
        max_output_tokens: int,
        first_seq_id: int,
    ) -> RequestRecord:
        """The request with its n sequences, ids ``first_seq_id`` onwards. Ids grow with
        arrival, so a sequence's id is also its first-come-first-served rank. Siblings of
        a seeded request get derived seeds."""
        record = cls(request_id, params, arrival_time, tuple(prompt_token_ids))
        for index in range(params.n):
            seq_params = params
            if index > 0 and params.seed is not None:
                seq_params = params.with_seed(derive_seed(params.seed, index))
            seq_id = first_seq_id + index
            record.sequences.append(
                Sequence(
                    seq_id, record, index, seq_params, prompt_token_ids, max_output_tokens, seq_id
                )
            )
        return record

    @property
    def is_done(self) -> bool:
        return self.num_released == len(self.sequences)


@dataclass(frozen=True)
class SequenceUpdate:
    """What one step changed for one sequence: a new token, a finish, or both."""

    seq_id: int
    request_id: str
    seq_index: int  # 0..n-1 within the request
    sampled: SampledToken | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id (or stop string) that matched
    error: str | None = None  # why, when finish_reason == "error"

    @classmethod
    def of(
        cls, seq: Sequence, sampled: SampledToken | None, error: str | None = None
    ) -> SequenceUpdate:
        return cls(
            seq_id=seq.seq_id,
            request_id=seq.request_id,
            seq_index=seq.seq_index,
            sampled=sampled,
            finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason,
            error=error,
        )

    @property
    def new_token_id(self) -> int | None:
        return None if self.sampled is None else self.sampled.token_id

    @property
    def logprob(self) -> float | None:
        return None if self.sampled is None else self.sampled.logprob

    @property
    def top_logprobs(self) -> tuple[TokenLogprob, ...]:
        return () if self.sampled is None else self.sampled.top_logprobs


def derive_seed(seed: int, seq_index: int) -> int:
    """A distinct, reproducible seed for sibling ``seq_index`` of a seeded request.

    Index 0 keeps the user's seed; others mix (seed, index) with the splitmix64 finalizer,
    which spreads neighbouring inputs far apart. The result is in [0, 2**63).
    """
    if seq_index == 0:
        return seed
    value = (seed * 0x9E3779B97F4A7C15 + seq_index * 0xBF58476D1CE4E5B9) & _MASK_64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK_64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK_64
    return (value ^ (value >> 31)) & _MASK_63
