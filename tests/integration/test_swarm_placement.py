"""Nodes started with no layer flags pick their layers from the swarm they join.

A head serves [0, 2) of a 4-layer model; a node started with only ``--molink-initial-peer``
takes exactly the missing [2, 4) and the head becomes ready; a second node started the
same way becomes a replica of the weakest span, [2, 4) again. Both log their choice.
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


def _unplaced_node(model: str, initial_peer: str) -> Node:
    http_port, grpc_port = free_port(), free_port()
    command = node_command(http_port, grpc_port, 0, -1, model, initial_peer)
    at = command.index("--molink-start-layer")
    del command[at : at + 4]  # neither --molink-start-layer nor --molink-end-layer
    return Node(start_process(command, http_port), grpc_port, -1, -1)


def test_unplaced_nodes_take_the_missing_span_then_a_replica(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3"))
    nodes = [start_node(0, 2, model)]
    try:
        wait_answering(nodes[0])
        for _ in range(2):
            nodes.append(_unplaced_node(model, nodes[0].grpc_address))
            wait_answering(nodes[-1])
            info = stage_info(nodes[-1])
            assert (info.layers.start, info.layers.end) == (2, 4)
        wait_ready(nodes[0].base_url)
        assert "served by no node" in nodes[1].log_text()
        assert "becomes a replica" in nodes[2].log_text()
    finally:
        for node in reversed(nodes):
            stop_node(node)
