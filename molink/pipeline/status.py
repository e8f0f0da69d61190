"""``molink status``: ask a node about itself and its pipeline, print tables: the stages,
and what the head has measured of every hop and stage."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import grpc

from molink.pipeline.identity import format_range
from molink.pipeline.wire import node_from_proto
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb

T = TypeVar("T")
_COLUMNS = (
    "NODE",
    "ADDRESS",
    "LAYERS",
    "KV TOKENS",
    "DTYPE/WIRE",
    "LAYER STEP",
    "TOKENS/S",
    "HEALTH",
    "STEPS",
    "SENT",
)
_LINK_COLUMNS = ("HOP", "BANDWIDTH", "RTT", "MESSAGES")
_TIMING_COLUMNS = ("NODE", "COMPUTE/STEP", "COMPUTE/TOKEN", "STEPS")


def pipeline_status(address: str, config: TransportConfig | None = None) -> str:
    """A printable report: the queried node, its head's pipeline, each stage's health."""
    config = config or TransportConfig()
    try:
        node = node_from_proto(_call(address, config, NodeClient.describe))
        pipeline = _call(address, config, NodeClient.get_pipeline)
    except grpc.RpcError as exc:
        return f"node at {address} is unreachable: {describe_rpc_error(exc)}"
    lines = [f"node {node.describe()}, model {node.model.served_name!r}"]
    if not pipeline.head_id:
        lines.append(pipeline.readiness or "not part of a pipeline")
        return "\n".join(lines)
    if pipeline.head_address and pipeline.head_address != node.address:
        try:  # the head's registry is the authority; a stage's view may lag
            pipeline = _call(
                pipeline.head_address, config, NodeClient.get_pipeline, pipeline.head_id
            )
        except grpc.RpcError as exc:
            lines.append(
                f"head {pipeline.head_id} at {pipeline.head_address} is unreachable "
                f"({describe_rpc_error(exc)}); showing this node's last view"
            )
    lines.append(
        f"head {pipeline.head_id} at {pipeline.head_address}, pipeline epoch {pipeline.epoch}, "
        f"{pipeline.num_layers} layers"
    )
    lines.append(pipeline.readiness or "ready: every layer is served")
    rows = [_stage_row(stage, config) for stage in pipeline.stages]
    lines.append(format_table(_COLUMNS, rows))
    lines += _measurements(pipeline)
    lines += [f"banned by spot checks: node {b.node_id}: {b.reason}" for b in pipeline.banned]
    return "\n".join(lines)


def _measurements(pipeline: pb.Pipeline) -> list[str]:
    """The head's link and compute estimates (absent when the node answering is not the
    head, or the head does not measure)."""
    lines: list[str] = []
    if pipeline.links:
        rows = [
            (
                f"{link.from_node_id}->{link.to_node_id}",
                _format_rate(link.bandwidth_bytes_per_s) if link.samples else "-",
                f"{link.rtt_s * 1e3:.1f} ms" if link.samples else "-",
                str(link.samples),
            )
            for link in pipeline.links
        ]
        lines += ["links (measured from the traffic):", format_table(_LINK_COLUMNS, rows)]
    if pipeline.timings:
        rows = [
            (
                t.node_id,
                f"{t.compute_s_per_step * 1e3:.2f} ms" if t.samples else "-",
                f"{t.compute_s_per_token * 1e3:.3f} ms" if t.samples else "-",
                str(t.samples),
            )
            for t in pipeline.timings
        ]
        lines += ["stage compute:", format_table(_TIMING_COLUMNS, rows)]
    return lines


def _format_rate(bytes_per_s: float) -> str:
    if math.isinf(bytes_per_s):
        return "not yet measured"  # no message was large enough to time the link's rate
    return f"{bytes_per_s * 8 / 1e6:.1f} Mbit/s"


def _call(
    address: str,
    config: TransportConfig,
    method: Callable[[NodeClient], T],
    expected_node_id: str | None = None,
) -> T:
    """``method``'s answer from ``address`` (in a swarm, from ``expected_node_id`` only)."""
    client = NodeClient(address, config, expected_node_id)
    try:
        return method(client)
    finally:
        client.close()


def _stage_row(stage: pb.NodeInfo, config: TransportConfig) -> tuple[str, ...]:
    info = node_from_proto(stage)
    client = NodeClient(info.address, config, info.node_id)
    try:
        health = client.health()
        state = "serving" if health.status == pb.HEALTH_STATUS_SERVING else "degraded"
        if health.message:
            state += f": {health.message}"
        steps, sent = str(health.steps_processed), _format_bytes(health.bytes_sent)
    except grpc.RpcError as exc:
        state, steps, sent = f"unreachable: {describe_rpc_error(exc)}", "-", "-"
    finally:
        client.close()
    capacity = str(info.kv_capacity_tokens) if info.kv_capacity_tokens else "-"
    return (
        info.node_id,
        info.address,
        format_range(info.layers),
        capacity,
        f"{info.dtype}/{info.wire_dtype}",
        format_layer_step(info.layer_step_s),
        f"{info.throughput_tokens_per_s:.0f}" if info.throughput_tokens_per_s else "-",
        state,
        steps,
        sent,
    )


def format_layer_step(seconds: float) -> str:
    """A node's probe time for one decoder layer (measured at start; 0: not measured)."""
    return f"{seconds * 1e3:.3g} ms" if seconds > 0 else "-"


def format_table(columns: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

    def render(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([render(columns), *(render(r) for r in rows)])


def _format_bytes(num: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num} B"
