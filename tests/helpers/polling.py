"""Bounded waits of the in-process pipeline tests: a head's next result, a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

from molink.pipeline.head import PipelineExecutor
from molink.step import StepResult


def first_result(head: PipelineExecutor, timeout: float = 30.0) -> StepResult:
    """The head's next step result; fails the test when none comes within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = head.poll(0.1)
        if results:
            return results[0]
    raise AssertionError("no result came back")


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds (checked every 50 ms)."""
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()
