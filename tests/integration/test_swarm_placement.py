"""Nodes started with no layer flags pick their layers from the swarm they join.

A head serves [0, 2) of a 4-layer model; a node started with only ``--molink-initial-peer``
takes exactly the missing [2, 4) and the head becomes ready; a second node started the
same way becomes a replica of the weakest span, [2, 4) again. Both log their choice. With
the DHT on, the nodes read the swarm from it as well (the second finds the first's record).
"""

from __future__ import annotations

import pytest

from tests.helpers.server_process import free_port, start_process
from tests.integration.pipeline_fixtures import (
    Node,
    node_command,
    stage_info,
    start_node,
    stop_node,
    wait_answering,
    wait_ready,
)

pytestmark = pytest.mark.integration


DHT_ON = ("--molink-dht", "on", "--molink-dht-ttl", "6")
# Every node states the same speed, so the replica's size does not depend on how loaded the
# machine was when each node would have probed itself (the speed rule has its unit tests).
SAME_SPEED = ("--molink-layer-step-ms", "1")


def _unplaced_node(model: str, initial_peer: str, extra_args: tuple[str, ...]) -> Node:
    http_port, grpc_port = free_port(), free_port()
    command = node_command(http_port, grpc_port, 0, -1, model, initial_peer, extra_args)
    at = command.index("--molink-start-layer")
    del command[at : at + 4]  # neither --molink-start-layer nor --molink-end-layer
    return Node(start_process(command, http_port), grpc_port, -1, -1)


@pytest.mark.parametrize("extra_args", [(), DHT_ON], ids=["peer-view", "dht"])
def test_unplaced_nodes_take_the_missing_span_then_a_replica(
    tiny_model_dir, extra_args: tuple[str, ...]
) -> None:
    model = str(tiny_model_dir("qwen3"))
    node_args = extra_args + SAME_SPEED
    nodes = [start_node(0, 2, model, extra_args=node_args)]
    try:
        wait_answering(nodes[0])
        for _ in range(2):
            nodes.append(_unplaced_node(model, nodes[0].grpc_address, node_args))
            wait_answering(nodes[-1])
            info = stage_info(nodes[-1])
            assert (info.layers.start, info.layers.end) == (2, 4)
        wait_ready(nodes[0].base_url)
        assert "served by no node" in nodes[1].log_text()
        assert "becomes a replica" in nodes[2].log_text()
        assert "(as configured)" in nodes[2].log_text()
        if extra_args:
            assert "record(s) in the DHT" in nodes[2].log_text()
            assert "0 record(s) in the DHT" not in nodes[2].log_text()
    finally:
        for node in reversed(nodes):
            stop_node(node)
