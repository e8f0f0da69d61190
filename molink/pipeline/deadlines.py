"""When a step in flight is overdue: deadlines that follow what each node measures.

A step's deadline is ``max(floor, factor * expected)`` after it was sent, where
``expected`` is the route's round trip for the step: every node's measured compute time
for that many tokens plus the head's measured round trip to it, times the steps ahead of
it on the same route (they are computed first). A frozen node (``kill -STOP``) keeps its
sockets open, so only a deadline notices it. A deadline that passes is a suspicion, not a
verdict: the head probes the route's nodes and evicts those that do not answer; if all
answer (a slow step on a loaded machine), the step gets another deadline of the same
length, until ``step_timeout_s`` after it was sent, when it fails as ``DEADLINE`` anyway.
So a busy node is never mistaken for a dead one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from molink.engine.telemetry import StageTiming
from molink.placement.route import Route


@dataclass
class StepClock:
    """The deadlines of one step in flight (time.monotonic() values)."""

    sent_at: float
    budget_s: float  # how long one deadline lasts
    deadline: float  # the next probe
    hard_deadline: float  # the step fails here even if every node still answers

    def extend(self, now: float) -> None:
        self.deadline = min(now + self.budget_s, self.hard_deadline)


@dataclass(frozen=True)
class DeadlinePolicy:
    floor_s: float = 2.0
    factor: float = 4.0


class StepDeadlines:
    """Computes each step's deadline from the head's live measurements."""

    def __init__(
        self,
        policy: DeadlinePolicy,
        hard_timeout_s: float,
        timings: Callable[[], dict[str, StageTiming]],
        round_trips: Callable[[], dict[str, float]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.hard_timeout_s = hard_timeout_s
        self._timings = timings
        self._round_trips = round_trips
        self._clock = clock

    def expected_s(self, route: Route, num_tokens: int) -> float:
        """The route's round trip for one step of ``num_tokens`` tokens (0: unmeasured)."""
        timings = self._timings()
        round_trips = self._round_trips()
        total = 0.0
        for hop in route.hops:
            timing = timings.get(hop.node_id)
            if timing is not None and timing.samples > 0:
                total += timing.compute_s_per_step + timing.compute_s_per_token * num_tokens
            total += round_trips.get(hop.node_id, 0.0)
        return total

    def clock_for(self, route: Route, num_tokens: int, steps_ahead: int) -> StepClock:
        now = self._clock()
        expected = self.expected_s(route, num_tokens) * (1 + steps_ahead)
        budget = max(self.policy.floor_s, self.policy.factor * expected)
        hard = now + max(self.hard_timeout_s, budget)
        return StepClock(now, budget, min(now + budget, hard), hard)
