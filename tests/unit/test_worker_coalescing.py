"""The compute thread hands the steps queued behind each other to the executor together."""

from __future__ import annotations

import threading
import time

import torch

from molink.errors import ProtocolError
from molink.pipeline.worker import COALESCE_MAX_TOKENS, ComputeWorker, ReleaseJob, StepJob
from molink.step import ScheduledSequence, StepPlan, StepResult


class RecordingExecutor:
    """Answers every plan with an empty StepResult and records how plans were grouped."""

    is_first = False
    is_last = True

    def __init__(self) -> None:
        self.calls: list[list[int] | str] = []

    def execute(self, plan: StepPlan, hidden: torch.Tensor | None, head_id: str = ""):
        self.calls.append([plan.step_id])
        return StepResult(step_id=plan.step_id, micro_batch=plan.micro_batch)

    def execute_many(self, steps, head_id: str = ""):
        self.calls.append([plan.step_id for plan, _ in steps])
        return [
            ProtocolError("bad plan")
            if plan.step_id == 99
            else StepResult(step_id=plan.step_id, micro_batch=plan.micro_batch)
            for plan, _ in steps
        ]

    def release(self, seq_ids: list[int], head_id: str = "") -> None:
        self.calls.append("release")


def _job(step_id: int, tokens: int = 1) -> StepJob:
    plan = StepPlan(step_id, (ScheduledSequence(step_id, 0, tokens),), (1,) * tokens)
    return StepJob("head", 0, plan, None, trusted=True)


def _run(jobs: list[StepJob | ReleaseJob], expected: int):
    executor = RecordingExecutor()
    outputs, errors = [], []
    done = threading.Event()

    def on_output(out) -> None:
        outputs.append(out)
        if len(outputs) + len(errors) == expected:
            done.set()

    def on_error(job, message, kind) -> None:
        errors.append((job.plan.step_id, message))
        if len(outputs) + len(errors) == expected:
            done.set()

    worker = ComputeWorker(executor, "s1", on_output, on_error, lambda job: None, 64, 60.0)
    for job in jobs:  # all queued before the thread starts: they wait together
        worker.submit(job, timeout=1.0)
    worker.start()
    try:
        assert done.wait(10.0)
        time.sleep(0.05)
    finally:
        worker.stop()
    return executor, outputs, errors


def test_queued_steps_run_in_one_pass_and_answer_one_by_one() -> None:
    executor, outputs, errors = _run([_job(1), _job(2), _job(3)], expected=3)
    assert executor.calls == [[1, 2, 3]]
    assert [o.job.plan.step_id for o in outputs] == [1, 2, 3] and not errors
    # The pass's compute time is shared out: every step reports its own hop.
    assert all(o.trace[-1].node_id == "s1" and o.trace[-1].compute_s >= 0 for o in outputs)


def test_a_release_between_steps_keeps_its_place() -> None:
    jobs = [_job(1), _job(2), ReleaseJob("head", 0, (7,), propagate=False), _job(3)]
    executor, outputs, _ = _run(jobs, expected=3)
    assert executor.calls == [[1, 2], "release", [3]]


def test_the_token_cap_splits_passes() -> None:
    big = COALESCE_MAX_TOKENS - 10
    executor, _, _ = _run([_job(1, big), _job(2, 20), _job(3, 5)], expected=3)
    assert executor.calls == [[1], [2, 3]]


def test_a_rejected_plan_fails_alone() -> None:
    executor, outputs, errors = _run([_job(1), _job(99), _job(3)], expected=3)
    assert [o.job.plan.step_id for o in outputs] == [1, 3]
    assert errors == [(99, "stage s1 rejected step 99 (micro-batch 0): bad plan")]
