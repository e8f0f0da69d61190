"""Routing over replicas behind emulated links: one replica of the tail behind 1 Gbit/s and
1 ms, another behind 20 Mbit/s and 50 ms. In steady state the head sends most sequences over
the fast one (the rule in molink/placement/router.py prices the slow one's round trip and
transfer); once the fast one dies, every sequence goes over the slow one, and all results
stay exact.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from molink.netem import LinkSpec
from tests.integration.swarm_netem import ReplicaSwarm

pytestmark = pytest.mark.integration

FAST = LinkSpec.from_rtt(rate_mbit=1000, rtt_ms=1)
SLOW = LinkSpec.from_rtt(rate_mbit=20, rtt_ms=50)
SEQUENCES = 24


@pytest.fixture
def swarm(tmp_path) -> Iterator[ReplicaSwarm]:
    swarm = ReplicaSwarm(tmp_path).start()
    try:
        swarm.spawn_replica("fast", FAST)
        swarm.spawn_replica("slow", SLOW)
        swarm.wait_measured({"fast", "slow"})
        yield swarm
    finally:
        swarm.close()


def _over(choices: dict[str, int], node_id: str) -> int:
    return sum(count for key, count in choices.items() if key.endswith(f"->{node_id}"))


def test_traffic_takes_the_fast_replica_then_the_slow_one_when_it_dies(
    swarm: ReplicaSwarm,
) -> None:
    swarm.run_sequences(SEQUENCES, prompt_tokens=128, decode_steps=4)
    choices = swarm.route_choices()
    assert _over(choices, "fast") + _over(choices, "slow") == SEQUENCES, choices
    assert _over(choices, "fast") >= 0.75 * SEQUENCES, choices

    swarm.kill("fast")
    before = _over(choices, "slow")
    swarm.run_sequences(8, prompt_tokens=128, decode_steps=4)
    after = swarm.route_choices()
    assert _over(after, "slow") - before == 8, after
    assert _over(after, "fast") == _over(choices, "fast")
