"""Starting a node's part in the swarm's DHT (``--molink-dht on``).

``--molink-initial-peer HOST:PORT`` keeps its meaning: the joining node asks that gRPC
peer for its DHT address (``Describe``) and bootstraps the DHT from it. Every node then
announces its record and renews it; a head also reads the records (DiscoveryWatch), so that
nodes joined through another head, and other heads' nodes, serve it too.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import grpc

from molink.discovery.announcer import Announcer
from molink.discovery.dht import BOOTSTRAP_TIMEOUT_S, SwarmDirectory
from molink.discovery.watch import DiscoveryWatch
from molink.errors import PipelineError
from molink.kv_cache.stage_pool import StageBlockPool
from molink.pipeline.head import PipelineExecutor
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.node import StageNode
from molink.placement.placement import ServedSpan
from molink.stage.resources import memory_of
from molink.transport import PROTOCOL_VERSION
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)

_RETRY_S = 0.5
# Most of the bootstrap budget goes to reaching the peer; the DHT daemon fails fast.
_DESCRIBE_BUDGET_S = BOOTSTRAP_TIMEOUT_S - 5.0


def dht_bootstrap_peers(initial_peer: str | None, config: TransportConfig) -> list[str]:
    """The DHT address of the initial peer, asked over gRPC; PipelineError (within
    BOOTSTRAP_TIMEOUT_S) if it cannot be reached or takes part in no DHT."""
    if not initial_peer:
        return []
    deadline = time.monotonic() + _DESCRIBE_BUDGET_S
    client = NodeClient(initial_peer, config)
    try:
        while True:
            try:
                info = client.describe(timeout=min(5.0, _DESCRIBE_BUDGET_S))
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"could not reach the initial peer {initial_peer} to find the swarm's "
                        f"DHT within {_DESCRIBE_BUDGET_S:.0f}s: {describe_rpc_error(exc)}"
                    ) from None
                time.sleep(_RETRY_S)
    finally:
        client.close()
    if not info.dht_address:
        raise PipelineError(
            f"the initial peer {initial_peer} takes part in no DHT (start it with --molink-dht on)"
        )
    return [info.dht_address]


def join_directory(
    model: ModelIdentity, initial_peer: str | None, host: str, config: TransportConfig
) -> SwarmDirectory:
    """Join the swarm's DHT, bootstrapped from the initial peer's DHT address."""
    peers = dht_bootstrap_peers(initial_peer, config)
    return SwarmDirectory(model, PROTOCOL_VERSION, config.security).start(host, peers)


def announced_spans(directory: SwarmDirectory) -> dict[str, ServedSpan]:
    """What the DHT's records say each node serves, with its measured throughput and speed."""
    return {
        r.info.node_id: ServedSpan(
            r.info.layers.start,
            r.info.layers.end,
            r.info.throughput_tokens_per_s,
            r.info.layer_step_s,
        )
        for r in directory.records()
    }


def measured_info(node: StageNode, free_kv_blocks: int) -> NodeInfo:
    """The node's record as of now: free KV, measured throughput, free device memory."""
    info = node.info
    return dataclasses.replace(
        info,
        free_kv_blocks=free_kv_blocks,
        throughput_tokens_per_s=node.throughput_tokens_per_s,
        memory_free_bytes=memory_of(info.device).free_bytes,
    )


def announce_stage(
    node: StageNode, directory: SwarmDirectory, ttl_s: float, pool: StageBlockPool | None
) -> None:
    def record() -> NodeInfo:
        free = pool.num_free if pool is not None else node.info.num_kv_blocks
        return measured_info(node, free)

    announcer = Announcer(directory, record, ttl_s).start()
    node.add_closer(announcer.stop)
    node.add_closer(directory.shutdown)


def watch_and_announce_head(
    head: PipelineExecutor,
    directory: SwarmDirectory,
    ttl_s: float,
    free_kv_blocks: Callable[[], int],
) -> None:
    """``free_kv_blocks``: what the head's scheduler has free for its own layers."""

    def record() -> NodeInfo:
        return measured_info(head.node, free_kv_blocks())

    announcer = Announcer(directory, record, ttl_s).start()
    watch = DiscoveryWatch(directory, head, interval_s=max(0.5, ttl_s / 6)).start()
    head.read_records_from(watch.record_times)
    head.add_closer(watch.stop)
    head.add_closer(announcer.stop)
    head.add_closer(directory.shutdown)
