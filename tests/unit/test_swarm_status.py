"""The swarm as ``molink status`` prints it from DHT records, and the head's coverage series."""

from __future__ import annotations

from molink.config import LayerRange
from molink.discovery.dht import SwarmRecord
from molink.discovery.status import coverage_lines, format_swarm
from molink.pipeline.head_metrics import swarm_metric_lines
from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import PipelineView
from molink.pipeline.toy import toy_identity

MODEL = toy_identity(6)


def _node(node_id: str, start: int, end: int, **kw) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), f"10.0.0.{start}:5", 64, 16, **kw)


def test_coverage_names_replicas_and_missing_layers() -> None:
    nodes = [_node("head", 0, 2), _node("b", 2, 4), _node("c", 2, 4), _node("d", 3, 4)]
    assert coverage_lines(nodes, 6) == [
        "[0, 2): 1 node: head",
        "[2, 3): 2 replicas: b, c",
        "[3, 4): 3 replicas: b, c, d",
        "[4, 6): MISSING, no node serves these layers",
    ]


def test_the_table_shows_device_memory_kv_speed_and_age() -> None:
    node = _node(
        "b",
        2,
        6,
        free_kv_blocks=40,
        throughput_tokens_per_s=950.4,
        device="cuda:0",
        memory_total_bytes=24 * 2**30,
        memory_free_bytes=6 * 2**30,
    )
    text = format_swarm([SwarmRecord(node, expires_in_s=9.5, age_s=5.5)], 6)
    header, row = text.splitlines()[1:3]
    assert header.split()[:4] == ["NODE", "ADDRESS", "LAYERS", "DEVICE"]
    for cell in ("b", "10.0.0.2:5", "[2, 6)", "cuda:0", "6.0/24.0 GiB", "40/64 blocks", "950"):
        assert cell in row
    assert row.rstrip().endswith("5.5 s  9.5 s")
    assert text.splitlines()[-2:] == [
        "  [0, 2): MISSING, no node serves these layers",
        "  [2, 6): 1 node: b",
    ]


def test_head_metrics_export_coverage() -> None:
    view = PipelineView("head", "h:1", 1, 6, (_node("head", 0, 2), _node("b", 2, 4)))
    lines = swarm_metric_lines(view, {"head>b": 3})
    assert "molink:layers_covered 4" in lines and "molink:layers_total 6" in lines
    assert 'molink:layer_replicas{layer="5"} 0' in lines
    assert 'molink:route_sequences_total{route="head>b"} 3' in lines
