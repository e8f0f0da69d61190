"""Heads share a node's compute in turns: a head with a long backlog cannot starve another."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from molink.pipeline.fair_queue import HeadFairQueue, QueueFullError
from molink.pipeline.worker import ComputeWorker, StepJob
from molink.step import ScheduledSequence, StepPlan
from tests.unit.test_worker_coalescing import RecordingExecutor


@dataclass
class Job:
    head_id: str
    n: int


def test_heads_take_turns_and_each_keeps_its_order() -> None:
    queue: HeadFairQueue[Job] = HeadFairQueue(max_per_head=100)
    for n in range(50):
        queue.put(Job("busy", n), timeout=0)
    queue.put(Job("quiet", 0), timeout=0)
    queue.put(Job("quiet", 1), timeout=0)
    order = [queue.get(timeout=0) for _ in range(6)]
    assert [(j.head_id, j.n) for j in order if j] == [
        ("busy", 0),
        ("quiet", 0),
        ("busy", 1),
        ("quiet", 1),
        ("busy", 2),
        ("busy", 3),
    ]
    assert queue.qsize() == 46 and queue.queued_by_head() == {"busy": 46}
    assert queue.get(timeout=0) == Job("busy", 4)


def test_a_pass_takes_only_its_own_heads_next_jobs() -> None:
    queue: HeadFairQueue[Job] = HeadFairQueue(max_per_head=10)
    for job in (Job("a", 0), Job("b", 0), Job("a", 1), Job("a", 2)):
        queue.put(job, timeout=0)
    first = queue.get(timeout=0)
    assert first == Job("a", 0)
    assert queue.take_next_if("a", lambda j: j.n < 2) == Job("a", 1)
    assert queue.take_next_if("a", lambda j: j.n < 2) is None  # stays first in a's queue
    assert queue.get(timeout=0) == Job("b", 0)  # b's turn came next all the same
    assert queue.get(timeout=0) == Job("a", 2)
    assert queue.get(timeout=0.01) is None


def test_one_heads_backlog_does_not_block_anothers_submission() -> None:
    queue: HeadFairQueue[Job] = HeadFairQueue(max_per_head=3)
    for n in range(3):
        queue.put(Job("busy", n), timeout=0)
    with pytest.raises(QueueFullError):
        queue.put(Job("busy", 3), timeout=0.01)
    queue.put(Job("quiet", 0), timeout=0)  # room of its own
    assert queue.qsize() == 4


def test_fresh_head_ids_do_not_escape_the_node_wide_bound() -> None:
    """Any member can make itself new head ids, each with a queue of its own: all heads
    together queue at most ``max_total``; a job waits for room, then is refused."""
    queue: HeadFairQueue[Job] = HeadFairQueue(max_per_head=3, max_total=4)
    for n in range(4):
        queue.put(Job(f"minted-{n}", 0), timeout=0)
    with pytest.raises(QueueFullError, match="4 steps of all heads are queued"):
        queue.put(Job("minted-4", 0), timeout=0.01)
    with pytest.raises(QueueFullError, match="4 steps of all heads"):
        queue.put(Job("minted-0", 1), timeout=0.01)  # within its own head's bound
    threading.Timer(0.05, lambda: queue.get(timeout=0)).start()
    queue.put(Job("minted-4", 0), timeout=10)  # room once a job is taken
    assert queue.qsize() == 4


def _step(head_id: str, step_id: int) -> StepJob:
    plan = StepPlan(step_id, (ScheduledSequence(step_id, 0, 1),), (1,))
    return StepJob(head_id, 0, plan, None, trusted=True)


def test_a_busy_head_cannot_starve_another_on_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    """Head A queues 40 steps, then head B one: B's step runs in the second pass, not after
    A's backlog (in arrival order it waited for every step A had queued ahead of it)."""
    import molink.pipeline.worker as worker_module

    monkeypatch.setattr(worker_module, "COALESCE_MAX_TOKENS", 1)  # one step per pass
    executor = RecordingExecutor()
    done = threading.Event()
    outputs: list[str] = []

    def on_output(out) -> None:
        outputs.append(out.job.head_id)
        if len(outputs) == 41:
            done.set()

    worker = ComputeWorker(executor, "s1", on_output, lambda *a: None, lambda job: None, 64, 60.0)
    for step_id in range(40):
        worker.submit(_step("A", step_id), timeout=1.0)
    worker.submit(_step("B", 100), timeout=1.0)
    worker.start()
    try:
        assert done.wait(10.0)
    finally:
        worker.stop()
    assert executor.calls[:3] == [[0], [100], [1]]
    assert outputs.index("B") == 1 and len(executor.calls) == 41
