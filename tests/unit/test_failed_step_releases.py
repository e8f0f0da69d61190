"""A step carries the releases of its route's finished sequences (``finished_seq_ids``).
When a node fails that step (no room, a rejected plan, an error), the nodes after it never
see the step, and the head has already forgotten those sequences: the node that failed
it must still free them and pass the release on along the route, in band, or the nodes
after it keep their KV for as long as the head renews its lease."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from molink.config import LayerRange
from molink.errors import ProtocolError
from molink.kv_cache.stage_pool import KVRoomError
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.worker import ComputeWorker, ReleaseJob, StepJob
from molink.placement.route import Route, RouteHop
from molink.step import FailureKind, ScheduledSequence, StepPlan, StepResult
from tests.helpers.toy_swarm import MODEL, PROMPT, hidden, prefill, toy_worker

ROUTE = Route(
    (RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 2), RouteHop("t", "x:3", 2, 4)), "x:1"
)


class _RoomlessExecutor(ToyStageExecutor):
    """Frees a plan's finished sequences, then has no room for its new ones."""

    def execute_many(
        self, steps: Sequence[tuple[StepPlan, torch.Tensor | None]], head_id: str = ""
    ) -> list[torch.Tensor | StepResult | ProtocolError | KVRoomError]:
        for plan, _ in steps:
            self.release(list(plan.finished_seq_ids), head_id)
        return [KVRoomError("no room") for _ in steps]


def _worker(executor: ToyStageExecutor, errors: list, releases: list) -> ComputeWorker:
    return toy_worker(
        executor,
        on_error=lambda job, message, kind: errors.append(kind),
        on_release=releases.append,
    )


def _started_with(worker: ComputeWorker, seq_id: int) -> None:
    plan = prefill(1, seq_id)
    worker._steps([StepJob("h", ROUTE, plan, hidden(plan))])


def test_a_rejected_plan_still_frees_its_finished_sequences_here_and_after() -> None:
    executor = ToyStageExecutor(LayerRange(1, 2), MODEL)
    errors: list[FailureKind] = []
    releases: list[ReleaseJob] = []
    worker = _worker(executor, errors, releases)
    _started_with(worker, 7)
    assert ("h", 7) in executor.sequences
    # Sequence 7 finished; the plan that says so also schedules one this node never got.
    plan = StepPlan(
        2, (ScheduledSequence(9, len(PROMPT), 1, (), True),), (5,), finished_seq_ids=(7,)
    )
    worker._steps([StepJob("h", ROUTE, plan, hidden(plan))])
    assert errors == [FailureKind.REJECTED]
    assert ("h", 7) not in executor.sequences
    assert [(r.seq_ids, r.propagate, r.route) for r in releases] == [((7,), True, ROUTE)]
    assert [r.started_before_step for r in releases] == [2]  # a later copy stays


def test_a_plan_refused_for_room_passes_its_releases_on() -> None:
    executor = _RoomlessExecutor(LayerRange(1, 2), MODEL)
    errors: list[FailureKind] = []
    releases: list[ReleaseJob] = []
    worker = _worker(executor, errors, releases)
    executor.sequences[("h", 7)] = len(PROMPT)
    worker._known["h"] = {7}
    plan = prefill(2, 8, finished=(7,))
    worker._steps([StepJob("h", ROUTE, plan, hidden(plan))])
    assert errors == [FailureKind.KV_FULL]
    assert ("h", 7) not in executor.sequences
    assert [(r.seq_ids, r.propagate, r.route) for r in releases] == [((7,), True, ROUTE)]
    assert [r.started_before_step for r in releases] == [2]  # a later copy stays


def test_a_plan_that_fails_without_finished_sequences_sends_no_release() -> None:
    executor = _RoomlessExecutor(LayerRange(1, 2), MODEL)
    errors: list[FailureKind] = []
    releases: list[ReleaseJob] = []
    worker = _worker(executor, errors, releases)
    plan = prefill(2, 8)
    worker._steps([StepJob("h", ROUTE, plan, hidden(plan))])
    assert errors == [FailureKind.KV_FULL]
    assert releases == []
