"""The steps in flight at the head, and the promise that each leaves ``poll`` exactly once.

One record per step (its route, deadlines and size): the deadline watch reads it to find
overdue steps, an eviction fails the steps whose route passes the lost node, and the first
outcome of a step (a result, or an error naming what failed) goes to the engine while late
or duplicate ones are dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable

from molink.pipeline.deadlines import StepClock, StepDeadlines
from molink.placement.route import Route
from molink.step import FailureKind, StepPlan, StepResult

logger = logging.getLogger(__name__)

StepKey = tuple[int, int]  # (step_id, micro_batch)


@dataclasses.dataclass
class Flight:
    """A step in flight: the route it took, its deadlines, its size (for timings) and the
    releases it carries (``finished_seq_ids``)."""

    route: Route
    clock: StepClock
    num_tokens: int
    decode_only: bool
    finished_seq_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CarriedRelease:
    """The releases a step carried when it failed on its way: the nodes of its route that
    it did not reach must still free them (up to copies started by ``step_id``)."""

    route: Route
    step_id: int
    seq_ids: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class StepCounts:
    completed: int
    failed: int
    sampled: int


class StepFlights:
    """Thread-safe: the engine submits and polls, the receiving, deadline and health
    threads complete steps."""

    def __init__(
        self,
        deadlines: StepDeadlines,
        on_carried_lost: Callable[[CarriedRelease, str], None] | None = None,
    ) -> None:
        self._deadlines = deadlines
        # A failed step's releases, with the node it failed at ("" when none is named):
        # the nodes it did not reach must still get them.
        self._on_carried_lost = on_carried_lost
        self._lock = threading.Lock()
        self._in_flight: dict[StepKey, Flight] = {}
        self._results: queue.Queue[StepResult] = queue.Queue()
        self._completed = self._failed = self._sampled = 0

    def start(self, plan: StepPlan, route: Route) -> None:
        """``plan`` leaves along ``route``; its deadline counts the steps ahead of it there."""
        key = (plan.step_id, plan.micro_batch)
        with self._lock:
            if key in self._in_flight:
                logger.warning("step %d (micro-batch %d) submitted twice", *key)
            ahead = sum(1 for f in self._in_flight.values() if f.route.key == route.key)
            self._in_flight[key] = Flight(
                route,
                self._deadlines.clock_for(route, plan.num_tokens, ahead),
                plan.num_tokens,
                _is_decode_only(plan),
                plan.finished_seq_ids,
            )

    def refuse(self, key: StepKey, message: str, kind: FailureKind) -> None:
        """A step that never left fails at once (its sequences wait for a route)."""
        self._results.put(error_result(key, message, kind))
        with self._lock:
            self._failed += 1

    def complete(self, result: StepResult) -> Flight | None:
        """Hand a step's outcome to poll() once; late or duplicate outcomes are dropped.
        Returns the step's record (None: it was no longer in flight)."""
        key = (result.step_id, result.micro_batch)
        with self._lock:
            flight = self._in_flight.pop(key, None)
            if flight is None:
                logger.debug("dropping a late outcome of step %d (micro-batch %d)", *key)
                return None
            if result.error is None:
                self._completed += 1
                self._sampled += len(result.sampled)
            else:
                self._failed += 1
        if result.error is not None:
            logger.warning("step %d (micro-batch %d) failed: %s", *key, result.error)
            if flight.finished_seq_ids and self._on_carried_lost is not None:
                carried = CarriedRelease(flight.route, key[0], flight.finished_seq_ids)
                self._on_carried_lost(carried, result.failed_node_id)
        self._results.put(result)
        return flight

    def poll(self, timeout: float) -> list[StepResult]:
        try:
            results = [self._results.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                return results

    def get(self, key: StepKey) -> Flight | None:
        with self._lock:
            return self._in_flight.get(key)

    def fail(
        self, reason: str, through: str | None = None, kind: FailureKind = FailureKind.NONE
    ) -> list[CarriedRelease]:
        """Fail the steps in flight (only those whose route passes ``through``, if given);
        returns the releases the failed steps carried."""
        with self._lock:
            keys = [
                key
                for key, flight in self._in_flight.items()
                if through is None or flight.route.contains(through)
            ]
        carried = []
        for key in keys:
            flight = self.complete(error_result(key, reason, kind, through or ""))
            if flight is not None and flight.finished_seq_ids:
                carried.append(CarriedRelease(flight.route, key[0], flight.finished_seq_ids))
        return carried

    def overdue(self, now: float) -> list[tuple[StepKey, StepClock, Route]]:
        with self._lock:
            return [
                (key, flight.clock, flight.route)
                for key, flight in self._in_flight.items()
                if flight.clock.deadline < now
            ]

    def extend(self, key: StepKey, clock: StepClock, now: float) -> None:
        """Another deadline for a step still in flight."""
        with self._lock:
            if key in self._in_flight:
                clock.extend(now)

    def counts(self) -> StepCounts:
        with self._lock:
            return StepCounts(self._completed, self._failed, self._sampled)


def _is_decode_only(plan: StepPlan) -> bool:
    return all(s.num_new_tokens <= 1 for s in plan.scheduled)


def error_result(
    key: StepKey, message: str, kind: FailureKind = FailureKind.NONE, node_id: str = ""
) -> StepResult:
    return StepResult(
        step_id=key[0], micro_batch=key[1], error=message, failure_kind=kind, failed_node_id=node_id
    )
