"""Transmission scheduling: how many prefill tokens the head lets into the pipeline at once.

A decode step moves one token's activations per sequence; a prefill chunk moves one per
prompt token, up to a thousand times more. Sent whole, a long prompt holds the slowest link
for seconds and every decode queued behind it waits. The head therefore caps the prefill
tokens it puts in flight from what the telemetry measured:

* ``round_trip_s`` (R): how long a decode micro-batch takes to come back when no prefill
  is in the way: every stage's compute time per decode-only step (the time per step of
  any kind until a decode-only step was timed) plus half of every hop's round trip.
* ``seconds_per_token`` (t): one token's activations on the slowest activation hop,
  ``hidden_bytes_per_token / bandwidth`` (the last stage -> head hop carries only sampled
  tokens and is left out).
* ``allowance = floor(alpha * R / t)``: prefill tokens that the slowest link carries in
  ``alpha`` decode round trips.

Rule for one plan (``prefill_token_budget``)::

    aged    = allowance * (1 + waited_s / aging_s)
    budget  = min(token_budget, max(floor_tokens, aged - prefill_tokens_in_flight))

where ``waited_s`` is how long the oldest prefill that the plan could advance has been in
progress (since its first chunk was scheduled; 0 for one not started yet), ``floor_tokens``
is one KV block and ``prefill_tokens_in_flight`` counts the prefill tokens of the plans
already in flight. So:

* at most ``alpha * R`` worth of prefill activations is queued on the slowest link at any
  time, and a decode behind it waits at most that long: its inter-token time grows by at
  most ``(1 + alpha)`` while prompts stream (decodes are scheduled first in every plan and
  count against the token budget only);
* a prefill always advances by at least one block per plan (the floor), so none is ever
  starved, and the head of the queue always starts at the next plan (FCFS); a prefill in
  progress for ``aging_s`` seconds gets twice the share, ``2 * aging_s`` three times, and
  so on up to the whole token budget, so that a steady decode load only slows a prompt
  down by a bounded factor (aging). Aging counts from the start of the prefill, not from
  the request's arrival: under overload every request has waited long in the queue, and
  ageing from arrival would lift the cap exactly when decodes most need it;
* before anything is measured (or on a single node, where there is no telemetry), with
  the mode off (the "prefill sent whole" baseline), or while no sequence decodes (nothing
  to protect; see molink/engine/pacing.py), there is no cap at all.

R comes from decode-only steps, so the prefill the budget lets in does not feed back into
the budget itself.

Replays are the exception to leaving compute out. After a node is lost, the sequences it
held are prefilled again, all at once and ahead of any new prompt; sent whole on a CPU that
is a step of seconds during which every other stream on the route waits. So each plan's
replay chunks are also capped by compute (``replay_token_budget``)::

    replay  = max(floor_tokens, floor(replay_share * R / c))

where ``c`` is the route's measured marginal compute per token (the sum over its stages).
A plan carrying replay chunks then takes at most about ``(1 + replay_share)`` decode round
trips, and its decodes, scheduled first, are always in it: the surviving streams slow down
by that factor while replays run instead of stopping. Before the compute per token is
measured the cap is ``_UNMEASURED_REPLAY_BLOCKS`` blocks; it is off with the mode off.

Compute is deliberately not part of t: a stage busy with a prefill chunk stalls decodes
too, but capping prefill by compute trades throughput for inter-token latency under any
burst (measured on a 2-core CPU, 32 simultaneous requests on loopback: 70 instead of 113
tokens/s, TTFT p50 21 s instead of 4 s); that trade is the token budget's job
(``--max-num-batched-tokens``), as in vLLM.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from molink.engine.telemetry import LinkEstimate, PipelineTelemetry, StageTiming
from molink.errors import InvalidParameterError
from molink.step import StepPlan

logger = logging.getLogger(__name__)

Clock = Callable[[], float]

# Keeps 0.04 / 0.001 from flooring to 39 tokens.
_ROUNDING_SLACK = 1e-9
# Replay tokens per plan, in KV blocks, until compute per token is measured.
_UNMEASURED_REPLAY_BLOCKS = 4


@dataclass(frozen=True)
class TransmissionConfig:
    """``enabled`` False is the baseline: prefill chunks take the whole token budget."""

    enabled: bool = True
    alpha: float = 1.0  # prefill in flight, in decode round trips of the slowest link
    aging_s: float = 2.0  # a prefill in progress gets one more share per aging_s seconds
    refresh_s: float = 0.25  # how often the telemetry is read again
    replay_share: float = 1.0  # replay compute per plan, in decode round trips

    def validate(self) -> None:
        if not self.alpha > 0:
            raise InvalidParameterError("transmission.alpha", "must be > 0")
        if not self.replay_share > 0:
            raise InvalidParameterError("transmission.replay_share", "must be > 0")
        if not self.aging_s > 0:
            raise InvalidParameterError("transmission.aging_s", "must be > 0")
        if self.refresh_s < 0:
            raise InvalidParameterError("transmission.refresh_s", "must be >= 0")


# -- the arithmetic ----------------------------------------------------------------------


def activation_hops(links: list[LinkEstimate]) -> list[LinkEstimate]:
    """Hops that carry hidden states: all but the last (last stage -> head) one."""
    return links[:-1]


def decode_round_trip_s(links: list[LinkEstimate], timings: list[StageTiming]) -> float:
    """R: every measured stage's compute per decode-only step (per step of any kind until
    one was timed) plus half of every hop's round trip."""
    compute = sum(
        t.compute_s_per_decode_step or t.compute_s_per_step for t in timings if t.samples > 0
    )
    return compute + sum(link.rtt_s for link in links) / 2


def slowest_seconds_per_token(
    links: list[LinkEstimate], hidden_bytes_per_token: int
) -> float | None:
    """t: seconds one token's activations take on the slowest measured activation hop;
    None while no activation hop has a measured bandwidth."""
    rates = [
        link.bandwidth_bytes_per_s
        for link in activation_hops(links)
        if 0 < link.bandwidth_bytes_per_s < math.inf
    ]
    if not rates or hidden_bytes_per_token <= 0:
        return None
    return hidden_bytes_per_token / min(rates)


def prefill_allowance(round_trip_s: float, seconds_per_token: float, alpha: float) -> int:
    """Prefill tokens the slowest link carries in ``alpha`` decode round trips."""
    return math.floor(alpha * round_trip_s / seconds_per_token + _ROUNDING_SLACK)


def prefill_token_budget(
    allowance: int,
    in_flight_prefill_tokens: int,
    waited_s: float,
    aging_s: float,
    floor_tokens: int,
    token_budget: int,
) -> int:
    """The rule of the module docstring: aged allowance less what is in flight, floored."""
    aged = math.floor(allowance * (1.0 + max(0.0, waited_s) / aging_s) + _ROUNDING_SLACK)
    return min(token_budget, max(floor_tokens, aged - in_flight_prefill_tokens))


def route_seconds_per_token(timings: list[StageTiming]) -> float | None:
    """c: the measured marginal compute of one token over every stage; None until measured."""
    total = sum(t.compute_s_per_token for t in timings if t.samples > 0)
    return total if total > 0 else None


def replay_token_budget(
    round_trip_s: float,
    seconds_per_token: float | None,
    share: float,
    floor_tokens: int,
    token_budget: int,
) -> int:
    """Replay tokens one plan may carry: ``share`` decode round trips of compute."""
    if seconds_per_token is None:
        return min(token_budget, _UNMEASURED_REPLAY_BLOCKS * floor_tokens)
    tokens = math.floor(share * round_trip_s / seconds_per_token + _ROUNDING_SLACK)
    return min(token_budget, max(floor_tokens, tokens))


def prefill_tokens_of(plan: StepPlan) -> int:
    """Tokens of a plan's prefill chunks (sequences given more than one token)."""
    return sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens > 1)


# -- the stateful part -------------------------------------------------------------------


class TransmissionScheduler:
    """Keeps the allowance up to date from the telemetry and answers per-plan budgets.

    ``allowance`` is None (no cap) when the mode is off, there is no telemetry, or nothing
    has been measured yet. ``clock`` also times the start of prefills (see the pacer).
    """

    def __init__(
        self,
        config: TransmissionConfig,
        telemetry: PipelineTelemetry | None,
        clock: Clock = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self.telemetry = telemetry
        self.clock = clock
        self.allowance: int | None = None
        # (R, c) of the replay cap; None until the telemetry was read.
        self._replay_measure: tuple[float, float | None] | None = None
        self._next_refresh = -math.inf

    def refresh(self, force: bool = False) -> int | None:
        """Re-read the telemetry (at most every ``refresh_s`` unless forced)."""
        now = self.clock()
        if not self.config.enabled or self.telemetry is None:
            return None
        if not force and now < self._next_refresh:
            return self.allowance
        self._next_refresh = now + self.config.refresh_s
        try:
            allowance = self._read(self.telemetry)
        except Exception:  # measurements are advisory: keep the last estimate, keep serving
            logger.warning("reading the pipeline telemetry failed", exc_info=True)
            return self.allowance
        if allowance != self.allowance:
            logger.debug("prefill tokens allowed in flight: %s -> %s", self.allowance, allowance)
        self.allowance = allowance
        return allowance

    def _read(self, telemetry: PipelineTelemetry) -> int | None:
        """The prefill allowance; keeps what the replay cap needs on the way."""
        links, timings = telemetry.link_estimates(), telemetry.stage_timings()
        round_trip = decode_round_trip_s(links, timings)
        self._replay_measure = (round_trip, route_seconds_per_token(timings))
        per_token = slowest_seconds_per_token(links, telemetry.hidden_bytes_per_token())
        if per_token is None:
            return None
        return prefill_allowance(round_trip, per_token, self.config.alpha)

    def budget(
        self,
        in_flight_prefill_tokens: int,
        prefill_started_at: float | None,
        floor_tokens: int,
        token_budget: int,
    ) -> int | None:
        """The prefill token budget of the next plan; None: no cap. ``prefill_started_at``:
        when the oldest prefill the plan could advance got its first chunk (None: not yet)."""
        if self.allowance is None:
            return None
        waited = 0.0 if prefill_started_at is None else self.clock() - prefill_started_at
        return prefill_token_budget(
            self.allowance,
            in_flight_prefill_tokens,
            waited,
            self.config.aging_s,
            floor_tokens,
            token_budget,
        )

    def replay_budget(self, floor_tokens: int, token_budget: int) -> int | None:
        """The replay token budget of the next plan (module docstring); None: no cap (the
        mode is off or there is no telemetry)."""
        if not self.config.enabled or self.telemetry is None:
            return None
        round_trip, per_token = self._replay_measure or (0.0, None)
        return replay_token_budget(
            round_trip, per_token, self.config.replay_share, floor_tokens, token_budget
        )
