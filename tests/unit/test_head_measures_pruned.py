"""What the head measured of a node (its compute estimate, the messages and bytes of the
hops to and from it) goes when the node leaves the pipeline: a swarm's churn mints node
ids, and every one of them (every pair, for hops) would stay counted, and exported on
/metrics, for as long as the head runs."""

from __future__ import annotations

from molink.transport.generated import molink_pb2 as pb
from tests.helpers.toy_swarm import toy_swarm


def _trace(*node_ids: str) -> list[pb.HopTrace]:
    return [pb.HopTrace(node_id=n, bytes_received=100, compute_s=0.01) for n in node_ids]


def test_a_node_that_leaves_takes_its_measurements_with_it() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head = swarm.head
        head._telemetry.record_step(4, _trace("h", "a", "n"))
        head._hops.count(_trace("h", "a", "n"), "n", 50)
        assert set(head._telemetry.timings_by_node()) == {"h", "a", "n"}
        assert set(head._hops.snapshot()) == {"h->a", "a->n", "n->h"}
        assert head.evict_node("a", "missed a step deadline, then a probe")
        assert set(head._telemetry.timings_by_node()) == {"h", "n"}
        assert set(head._hops.snapshot()) == {"n->h"}
        counters = head._hops.snapshot()["n->h"]
        assert (counters.messages, counters.bytes) == (1, 50)  # kept as counted
