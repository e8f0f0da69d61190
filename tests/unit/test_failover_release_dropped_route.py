"""After a node is lost, the nodes before it on its routes are freed by an in-band release
along the old route, which names the lost node. A node that has already learnt from the
head's new view that the node was dropped must still take that release: refusing it (as
it refuses steps along routes through dropped nodes) left the sequences' KV on it for as
long as the head renewed its lease."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from molink.errors import PipelineError
from molink.pipeline import PipelineExecutor, StageNode
from molink.pipeline.node_inbound import check_route
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.wire import route_to_proto
from molink.pipeline.worker import ReleaseJob
from molink.placement.route import Route, RouteHop
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import node_info, prefill, toy_swarm


@pytest.fixture
def chain() -> Iterator[tuple[PipelineExecutor, dict[str, ToyStageExecutor], dict[str, StageNode]]]:
    """head [0, 1) -> a [1, 2) -> x [2, 3) -> b [3, 4)."""
    with toy_swarm((("a", 1, 2), ("x", 2, 3), ("b", 3, 4))) as swarm:
        yield swarm.head, swarm.executors, swarm.nodes


def test_a_node_before_the_lost_one_frees_its_sequences_after_learning_of_the_loss(
    chain, monkeypatch
) -> None:
    head, executors, nodes = chain
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    assert ("h", 7) in executors["a"].sequences
    held: list[ReleaseJob] = []
    monkeypatch.setattr(head._failover, "_submit", held.append)
    assert head.evict_node("x", "taken out by the test")
    # The new view reaches a before the release does (the release queues behind steps).
    assert wait_until(lambda: "x" in nodes["a"].links.dropped_by("h"))
    rejected = nodes["a"].steps_rejected
    assert [job.seq_ids for job in held] == [(7,)]
    for job in held:
        head.node.submit(job)
    assert wait_until(
        lambda: ("h", 7) not in executors["a"].sequences or nodes["a"].steps_rejected > rejected
    )
    assert ("h", 7) not in executors["a"].sequences
    assert nodes["a"].steps_rejected == rejected


def _forward(route: Route) -> pb.ForwardRequest:
    request = pb.ForwardRequest(head_id="h", sender_id="a")
    request.route.CopyFrom(route_to_proto(route))
    return request


@pytest.mark.parametrize(
    ("dropped", "releasing", "allowed"),
    [
        ("x", True, True),  # the lost node comes after this one: the release is taken
        ("x", False, False),  # a step along that route is not
        ("a", True, False),  # nor a release that came through a dropped node
    ],
)
def test_a_release_may_name_dropped_nodes_only_after_this_one(
    dropped: str, releasing: bool, allowed: bool
) -> None:
    hops = ("h", 0, 1), ("a", 1, 2), ("s", 2, 3), ("x", 3, 4)
    route = Route(tuple(RouteHop(n, f"{n}:1", a, b) for n, a, b in hops), "h:1")
    info = node_info("s", 2, 3)
    request = _forward(route)

    def check() -> Route:
        return check_route(request, info, False, lambda head: frozenset({dropped}), releasing)

    if allowed:
        assert check() == route
    else:
        with pytest.raises(PipelineError, match=f"names {dropped}"):
            check()
