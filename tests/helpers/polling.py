"""Bounded waits of the in-process pipeline tests: a head's next results, a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

from molink.pipeline.head import PipelineExecutor
from molink.step import StepResult


def first_result(head: PipelineExecutor, timeout: float = 30.0) -> StepResult:
    """The result of the one step in flight at ``head``; fails the test when none comes
    within ``timeout``, or when more than one comes (``poll`` returns every result that
    is ready: with several steps in flight, take them all with ``results_of``)."""
    (result,) = results_of(head, 1, timeout)
    return result


def results_of(head: PipelineExecutor, count: int, timeout: float = 30.0) -> list[StepResult]:
    """The next ``count`` results of ``head``, in the order they came; fails the test when
    fewer come within ``timeout`` or more come than ``count``."""
    deadline = time.monotonic() + timeout
    results: list[StepResult] = []
    while len(results) < count and time.monotonic() < deadline:
        results += head.poll(0.1)
    steps = [(r.step_id, r.micro_batch) for r in results]
    assert len(results) >= count, f"{len(results)} of {count} results came back: {steps}"
    assert len(results) == count, f"{len(results)} results came back, {count} expected: {steps}"
    return results


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds (checked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()
