"""After a node is lost, the nodes behind it on its routes are told directly to free its
sequences. That call travels apart from the steps: a replay of one of those sequences
through the same node may get there first. The release must then leave the replay's copy
alone (it names the first step not yet submitted at the loss; the node keeps copies that
later plans started)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.failover import FailoverDesk
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.pipeline.worker import ComputeWorker, ReleaseJob, StepJob
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig
from tests.helpers.polling import first_result, wait_until

MODEL = toy_identity(4)
CONFIG = TransportConfig(step_timeout_s=30.0, health_interval_s=60.0, lease_s=200.0)
PROMPT = (1, 2, 3)


def _info(node_id: str, start: int, end: int) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), "127.0.0.1:0")


def _prefill(step_id: int, seq_id: int) -> StepPlan:
    return StepPlan(
        step_id,
        (ScheduledSequence(seq_id, 0, len(PROMPT), (), True),),
        PROMPT,
        (NewSequenceData(seq_id, PROMPT, len(PROMPT), SamplingParams(temperature=0.0)),),
    )


@pytest.fixture
def swarm() -> Iterator[tuple[PipelineExecutor, list[StageNode]]]:
    """head [0, 1); replicas a and b of [1, 2); n serves [2, 4) behind either."""
    head = PipelineExecutor(ToyStageExecutor(LayerRange(0, 1), MODEL), _info("h", 0, 1), CONFIG)
    head.start()
    nodes: list[StageNode] = []
    try:
        for node_id, start, end in (("a", 1, 2), ("b", 1, 2), ("n", 2, 4)):
            executor = ToyStageExecutor(LayerRange(start, end), MODEL)
            info = _info(node_id, start, end)
            nodes.append(StageNode(executor, info, CONFIG, initial_peer=head.address).start())
        assert wait_until(lambda: len(head.pipeline().stages) == 4 and head.readiness() is None)
        yield head, nodes
    finally:
        for node in nodes:
            node.stop()
        head.close()


def test_a_replay_that_overtakes_the_release_of_its_old_copy_keeps_its_kv(
    swarm, monkeypatch
) -> None:
    head, _ = swarm
    gate, released = threading.Event(), threading.Event()
    original = FailoverDesk._release_directly

    def held_release(self, addresses, seq_ids, before):
        gate.wait(30.0)  # the release is slow to arrive: the replay gets there first
        original(self, addresses, seq_ids, before)
        released.set()

    monkeypatch.setattr(FailoverDesk, "_release_directly", held_release)
    head.submit(_prefill(0, 7))
    assert first_result(head).error is None
    (lost,) = [node for node, count in head.routes.load().items() if count and node in ("a", "b")]
    assert head.evict_node(lost, "taken out by the test")
    head.submit(_prefill(1, 7))  # the replay, through the other replica and n
    first = first_result(head)
    assert first.error is None
    gate.set()
    assert released.wait(30.0)
    token = first.sampled[0].token_id
    head.submit(StepPlan(2, (ScheduledSequence(7, len(PROMPT), 1, (), True),), (token,)))
    second = first_result(head)
    assert second.error is None, second.error
    assert second.sampled[0].token_id == expected_token(token, 7, 4)


def _worker() -> ComputeWorker:
    return ComputeWorker(
        ToyStageExecutor(LayerRange(1, 2), MODEL),
        "s",
        on_output=lambda out: None,
        on_error=lambda job, message, kind: None,
        on_release=lambda job: None,
        max_queued=8,
        upstream_stall_s=60.0,
    )


@pytest.mark.parametrize(("before", "kept"), [(5, True), (6, False), (None, False)])
def test_a_release_frees_only_copies_older_than_its_step(before, kept) -> None:
    worker = _worker()
    route = Route((RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 2)), "x:1")
    job = StepJob("h", route, _prefill(5, 7), None)
    worker._admit(job)
    worker._release(ReleaseJob("h", None, (7,), False, before))
    assert (7 in worker._known["h"]) == kept
