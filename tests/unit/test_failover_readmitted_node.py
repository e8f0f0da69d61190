"""A node evicted while it was still alive (frozen for a few seconds, cut off for a
while) keeps the KV of the sequences it held: the head forgets them at the eviction and
frees them only on the other nodes. Its lease on the head's sequences frees them once the
head has not spoken to it for ``lease_s``; but when the head takes it back sooner (it
renews its DHT record, or joins again), the head's health checks renew that lease and
the node would keep those sequences for as long as the head lives. The head frees them
there when it takes the node back."""

from __future__ import annotations

from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import prefill, toy_swarm


def test_a_node_taken_back_frees_what_it_held_when_it_was_evicted(monkeypatch) -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, held = swarm.head, swarm.executors["a"]
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        assert ("h", 7) in held.sequences
        # The in-band release along the old route may pass on to the lost node while its
        # stream is still open; here it does not (the stream of a frozen node is cut).
        monkeypatch.setattr(head._failover, "_submit", lambda job: None)
        assert head.evict_node("a", "missed a step deadline, then a probe")
        assert wait_until(lambda: ("h", 7) not in swarm.executors["n"].sequences)
        assert ("h", 7) in held.sequences  # nothing reaches a node out of the routes
        assert head.admit_discovered(swarm.nodes["a"].info) is None
        assert wait_until(lambda: ("h", 7) not in held.sequences, timeout=10.0)
        # It serves again: a new sequence goes through it.
        head.submit(prefill(1, 8))
        assert first_result(head).error is None
        assert ("h", 8) in held.sequences
