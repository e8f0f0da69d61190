"""``molink status --peer ADDR``: the pipeline as the peer's head sees it, then the swarm as
the DHT holds it.

The DHT part joins the swarm's DHT for a moment as a client (bootstrapped from the peer's
DHT address, as a joining node is) and prints every valid record: node, span, device and
memory, free KV, measured throughput, the age of the record and when it expires; then the
coverage of every layer (ranges of layers with the nodes serving them: more than one node
is a replica), and the layers nobody serves.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from molink.discovery.dht import SwarmDirectory, SwarmRecord
from molink.errors import PipelineError
from molink.pipeline.identity import NodeInfo
from molink.pipeline.status import format_layer_step, format_table, pipeline_status
from molink.pipeline.wire import node_from_proto
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig

_COLUMNS = (
    "NODE",
    "ADDRESS",
    "LAYERS",
    "DEVICE",
    "MEMORY FREE/TOTAL",
    "KV FREE/TOTAL",
    "LAYER STEP",
    "TOKENS/S",
    "AGE",
    "EXPIRES IN",
)


def swarm_status(address: str, config: TransportConfig | None = None) -> str:
    config = config or TransportConfig()
    report = pipeline_status(address, config)
    client = NodeClient(address, config)
    try:
        node = node_from_proto(client.describe(timeout=10.0))
    except grpc.RpcError as exc:
        return f"{report}\nswarm: {address} did not answer ({describe_rpc_error(exc)})"
    finally:
        client.close()
    if not node.dht_address:
        return (
            f"{report}\nswarm: {address} takes part in no DHT (--molink-dht off, or none started)"
        )
    try:
        records = read_swarm(node, config)
    except PipelineError as exc:
        return f"{report}\nswarm: {exc}"
    return f"{report}\n" + format_swarm(records, node.model.num_layers)


def read_swarm(node: NodeInfo, config: TransportConfig) -> list[SwarmRecord]:
    """The records, opened with this client's swarm credentials when it has them (a swarm
    with a key seals its records: only members read them)."""
    directory = SwarmDirectory(node.model, node.protocol_version, config.security)
    directory.start("127.0.0.1", [node.dht_address], client_mode=True)
    try:
        return directory.records()
    finally:
        directory.shutdown()


def format_swarm(records: Sequence[SwarmRecord], num_layers: int) -> str:
    lines = [f"swarm (from the DHT): {len(records)} node(s)"]
    if records:
        lines.append(format_table(_COLUMNS, [_row(r) for r in records]))
    lines.append("coverage per layer:")
    lines += [f"  {line}" for line in coverage_lines([r.info for r in records], num_layers)]
    return "\n".join(lines)


def coverage_lines(nodes: Sequence[NodeInfo], num_layers: int) -> list[str]:
    """Consecutive layers served by the same nodes, one line each."""
    servers = [
        tuple(sorted(n.node_id for n in nodes if n.layers.start <= layer < n.layers.end))
        for layer in range(num_layers)
    ]
    lines: list[str] = []
    start = 0
    for layer in range(1, num_layers + 1):
        if layer < num_layers and servers[layer] == servers[start]:
            continue
        lines.append(_coverage_line(start, layer, servers[start]))
        start = layer
    return lines


def _coverage_line(start: int, end: int, node_ids: tuple[str, ...]) -> str:
    span = f"[{start}, {end})"
    if not node_ids:
        return f"{span}: MISSING, no node serves these layers"
    kind = "replicas" if len(node_ids) > 1 else "node"
    return f"{span}: {len(node_ids)} {kind}: {', '.join(node_ids)}"


def _row(record: SwarmRecord) -> tuple[str, ...]:
    info = record.info
    memory = (
        f"{_gib(info.memory_free_bytes)}/{_gib(info.memory_total_bytes)} GiB"
        if info.memory_total_bytes
        else "-"
    )
    rate = f"{info.throughput_tokens_per_s:.0f}" if info.throughput_tokens_per_s else "-"
    return (
        info.node_id,
        info.address,
        f"[{info.layers.start}, {info.layers.end})",
        info.device,
        memory,
        f"{info.free_kv_blocks}/{info.num_kv_blocks} blocks",
        format_layer_step(info.layer_step_s),
        rate,
        f"{record.age_s:.1f} s" if record.age_s is not None else "-",
        f"{record.expires_in_s:.1f} s",
    )


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f}"
