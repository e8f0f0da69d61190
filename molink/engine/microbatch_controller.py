"""Adaptive micro-batching: how many plans the head keeps in flight.

One micro-batch's round trip ``R(n)`` (n tokens) is every stage's compute, every
activation hop's transfer and every hop's one-way latency; the busiest resource (a stage
or a link) serves one micro-batch per ``B(n)``. With K micro-batches in flight, splitting a
load of L tokens per round trip into plans of ``n = L / K`` tokens, that resource has
``fill(K) = K * B(L / K) / R(L / K)`` units of work per round trip; below 1 it idles
(the bubble), above 1 plans queue in front of it. The rule:

    K = the smallest K in [1, min(stages + max_extra, running sequences)] with fill(K) >= 1

i.e. just enough plans to cover the pipeline bubble and no more: beyond it, extra plans
only add per-step overhead and split the batch finer. A stage's time per step is modelled
as ``fixed + per_token * n``, with ``fixed = compute_s_per_step - compute_s_per_token *
n_observed`` (n_observed: the mean tokens of the plans sent); with no token counts yet the
step time counts as fixed and the rule is ``ceil((sum of stage compute + sum of hop
latency) / max stage compute)``.

Hysteresis: K rises only when ``fill(K) < 1 - dead_band``, falls only when one plan fewer
still gives ``fill(K - 1) >= 1 + dead_band``, and either move must be proposed by
``patience`` consecutive evaluations (at most one per ``interval_s``), so that noise in
the measurements does not make K flap. A pinned K (``--molink-micro-batches N``) never
moves; with nothing measured K stays at ``stages + 1``; while nothing runs it is left as
it is for the next burst. The plans share the running sequences evenly
(``balanced_decode_cap``, applied by molink/engine/pacing.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from molink.engine.telemetry import LinkEstimate, PipelineTelemetry, StageTiming
from molink.engine.transmission import activation_hops
from molink.errors import InvalidParameterError

logger = logging.getLogger(__name__)

# Keeps 12 * 0.02 / 0.24 from counting as a bubble.
_FILL_SLACK = 1e-9


@dataclass(frozen=True)
class MicroBatchPolicy:
    max_extra: int = 4  # K <= stages + max_extra
    dead_band: float = 0.15
    patience: int = 3
    interval_s: float = 0.5

    def validate(self) -> None:
        if self.max_extra < 0:
            raise InvalidParameterError("micro_batches.max_extra", "must be >= 0")
        if not 0 <= self.dead_band < 1:
            raise InvalidParameterError("micro_batches.dead_band", "must be in [0, 1)")
        if self.patience < 1:
            raise InvalidParameterError("micro_batches.patience", "must be >= 1")


@dataclass(frozen=True)
class PipelineModel:
    """Per micro-batch costs in seconds as functions of the tokens ``n`` it carries."""

    stage_fixed_s: tuple[float, ...]
    stage_per_token_s: tuple[float, ...]
    hop_per_token_s: tuple[float, ...]  # activation hops; 0 while unmeasured
    latency_s: float  # one way, summed over every hop

    def _costs(self, tokens: float) -> list[float]:
        stages = [
            f + p * tokens for f, p in zip(self.stage_fixed_s, self.stage_per_token_s, strict=True)
        ]
        return stages + [p * tokens for p in self.hop_per_token_s]

    def round_trip_s(self, tokens: float) -> float:
        return sum(self._costs(tokens)) + self.latency_s

    def bottleneck_s(self, tokens: float) -> float:
        return max(self._costs(tokens), default=0.0)

    def fill(self, num_micro_batches: int, load_tokens: float) -> float:
        """How busy the busiest resource is with this many plans sharing the load."""
        tokens = load_tokens / num_micro_batches
        round_trip = self.round_trip_s(tokens)
        if round_trip <= 0:
            return 1.0
        return num_micro_batches * self.bottleneck_s(tokens) / round_trip


def pipeline_model(
    links: list[LinkEstimate],
    timings: list[StageTiming],
    hidden_bytes_per_token: int,
    tokens_per_plan: float | None,
) -> PipelineModel | None:
    """None until every stage has a timing sample (or when compute is still zero)."""
    if not timings or any(t.samples <= 0 for t in timings):
        return None
    if not any(t.compute_s_per_step > 0 for t in timings):
        return None
    observed = tokens_per_plan or 0.0
    per_token = tuple(max(0.0, t.compute_s_per_token) for t in timings)
    fixed = tuple(
        max(0.0, t.compute_s_per_step - p * observed)
        for t, p in zip(timings, per_token, strict=True)
    )
    hops = tuple(
        hidden_bytes_per_token / link.bandwidth_bytes_per_s
        if 0 < link.bandwidth_bytes_per_s < math.inf and hidden_bytes_per_token > 0
        else 0.0
        for link in activation_hops(links)
    )
    latency = sum(link.rtt_s for link in links) / 2
    return PipelineModel(fixed, per_token, hops, latency)


def covering_micro_batches(model: PipelineModel, load_tokens: float, max_k: int) -> int:
    """The smallest K in [1, max_k] whose plans keep the busiest resource busy."""
    for k in range(1, max_k + 1):
        if model.fill(k, load_tokens) >= 1.0 - _FILL_SLACK:
            return k
    return max_k


def balanced_decode_cap(num_running: int, num_micro_batches: int) -> int | None:
    """Most decodes one plan takes so that the running sequences spread evenly over the
    micro-batches in flight; None (no cap) with a single micro-batch."""
    if num_micro_batches <= 1:
        return None
    return max(1, math.ceil(num_running / num_micro_batches))


class MicroBatchController:
    """Follows the telemetry with the rule and hysteresis of the module docstring."""

    def __init__(
        self,
        telemetry: PipelineTelemetry | None,
        pinned: int = 0,
        policy: MicroBatchPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if pinned < 0:
            raise InvalidParameterError("micro_batches", "must be >= 0 (0: adaptive)")
        self.policy = policy or MicroBatchPolicy()
        self.policy.validate()
        self.telemetry = telemetry
        self.pinned = pinned
        self.clock = clock
        self.current = pinned or 2
        self._num_stages = 1
        self._streak: list[int] = []  # consecutive proposals, all on the same side
        self._next_evaluation = -math.inf

    def reset(self, num_stages: int) -> int:
        """The pipeline changed: start again from ``stages + 1`` (or the pinned value)."""
        self._num_stages = max(1, num_stages)
        self.current = self.pinned or self._num_stages + 1
        self._streak = []
        self._next_evaluation = -math.inf
        return self.current

    def max_micro_batches(self, num_running: int | None = None) -> int:
        """``stages + max_extra``, and above the floor (``stages + 1``) no more than there
        are running sequences to share out (a plan holds at least one). Below the floor
        the running count does not pull K down: a lull would otherwise leave K at 1 when
        the next burst comes, and climbing back takes the hysteresis' patience."""
        limit = self._num_stages + self.policy.max_extra
        if num_running is None:
            return limit
        return max(self._floor(limit), min(limit, num_running))

    def _floor(self, max_k: int) -> int:
        return min(self._num_stages + 1, max_k)

    def update(self, tokens_per_plan: float | None, num_running: int | None = None) -> int:
        """Re-evaluate (at most every ``interval_s``); returns the K to use now. With no
        sequence running nothing is learnt, and K stays as it is for the next burst."""
        now = self.clock()
        if self.pinned or self.telemetry is None or now < self._next_evaluation:
            return self.current
        if num_running == 0:
            return self.current
        self._next_evaluation = now + self.policy.interval_s
        try:
            model = pipeline_model(
                self.telemetry.link_estimates(),
                self.telemetry.stage_timings(),
                self.telemetry.hidden_bytes_per_token(),
                tokens_per_plan,
            )
        except Exception:  # measurements are advisory: keep K, keep serving
            logger.warning("reading the pipeline telemetry failed", exc_info=True)
            return self.current
        if model is not None:
            load = (tokens_per_plan or 0.0) * self.current
            proposal = self.propose(model, load, self.max_micro_batches(num_running))
            logger.debug(
                "micro-batches: K=%d, fill %.2f, proposed %d (%s, load %.1f tokens)",
                self.current,
                model.fill(self.current, load),
                proposal,
                model,
                load,
            )
            self._follow(proposal)
        return self.current

    def propose(self, model: PipelineModel, load_tokens: float, max_k: int) -> int:
        """The K the rule wants now (at most ``max_k``), or the current K when the change
        is within the dead band."""
        current = min(self.current, max_k)
        # Never below stages + 1: with fewer plans than stages some stage idles by
        # construction, and measured per-token costs on a loaded host understate the
        # bubble (seen on CPUs, where K=2 lost a third of the throughput of K=3). The
        # measured model only raises K above this floor, for links whose latency dominates.
        floor = self._floor(max_k)
        if current < floor:  # e.g. pinned lower before, or a smaller pipeline: no band
            return floor
        target = max(covering_micro_batches(model, load_tokens, max_k), floor)
        band = self.policy.dead_band
        if target > current and model.fill(current, load_tokens) < 1.0 - band:
            return target
        if target < current and model.fill(current - 1, load_tokens) >= 1.0 + band:
            return target
        return current

    def _follow(self, proposal: int) -> None:
        if proposal == self.current:
            self._streak = []
            return
        rising = proposal > self.current
        if self._streak and (self._streak[-1] > self.current) != rising:
            self._streak = []
        self._streak.append(proposal)
        if len(self._streak) >= self.policy.patience:
            logger.info("micro-batches in flight: %d -> %d", self.current, proposal)
            self.current = proposal
            self._streak = []
