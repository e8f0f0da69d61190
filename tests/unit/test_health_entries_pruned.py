"""What the head's health monitor keeps of a node (its latest answer, its failure count,
its round trip) goes when the node leaves the pipeline: a swarm's churn mints new node
ids, and entries kept for departed ones would pile up for as long as the head runs. A
check round that read the view before the node left records nothing of it afterwards."""

from __future__ import annotations

from molink.transport.generated import molink_pb2 as pb
from tests.helpers.toy_swarm import toy_swarm


def _entries(monitor, node_id: str) -> list[str]:
    """Which of the monitor's per-node records still hold ``node_id``."""
    kept = {
        "latest": monitor._latest,
        "failures": monitor._failures,
        "round_trips": monitor._round_trips,
    }
    return [name for name, entries in kept.items() if node_id in entries]


def test_a_node_that_leaves_takes_its_health_entries_with_it() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, monitor = swarm.head, swarm.head._monitor
        monitor.check_once()
        assert _entries(monitor, "a") == ["latest", "failures", "round_trips"]
        assert head.evict_node("a", "missed a step deadline, then a probe")
        assert _entries(monitor, "a") == []
        assert _entries(monitor, "n") == ["latest", "failures", "round_trips"]
        assert set(head.stage_health()) == {"n"}


def test_a_round_that_ends_after_the_node_left_records_nothing_of_it() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, monitor, info = swarm.head, swarm.head._monitor, swarm.nodes["a"].info
        downs: list[str] = []
        monitor._on_stage_down = lambda stage, detail: downs.append(stage.node_id)
        assert head.evict_node("a", "missed a step deadline, then a probe")
        # What a round started before the eviction does with the answers it gets after.
        monitor._note_round_trip(info, 0.01)
        monitor._answered(info, pb.HealthResponse(status=pb.HEALTH_STATUS_SERVING))
        for _ in range(monitor._config.health_failures_to_down):
            monitor._failed(info, "deadline exceeded")
        assert _entries(monitor, "a") == []
        assert downs == []  # no second take-down of a node already gone


def test_a_client_closed_under_a_round_fails_no_thread() -> None:
    # A removal's prune (another thread) can close a client between the monitor handing
    # it out and its call: gRPC then raises ValueError, which killed the push thread and
    # aborted a check round (the other nodes went unchecked) or a probe.
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, monitor, info = swarm.head, swarm.head._monitor, swarm.nodes["a"].info
        assert monitor.probe(info) is None
        monitor._clients[(info.address, info.node_id)].close()
        monitor._push(head._registry.view(), [info])
        monitor.check_once()
        assert _entries(monitor, "n") == ["latest", "failures", "round_trips"]
        assert monitor.probe(info) == "no longer in the pipeline"
