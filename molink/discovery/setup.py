"""Starting a node's part in the swarm's DHT (``--molink-dht auto``, the default, or ``on``).

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


def peer_dht_address(initial_peer: str, config: TransportConfig, budget_s: float) -> str:
    """The DHT address of the initial peer, asked over gRPC ("" when it takes part in no
    DHT); PipelineError if it cannot be reached within ``budget_s``."""
    deadline = time.monotonic() + budget_s
    client = NodeClient(initial_peer, config)
    try:
        while True:
            try:
                return client.describe(timeout=min(5.0, budget_s)).dht_address
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"could not reach the initial peer {initial_peer} to find the swarm's "
                        f"DHT within {budget_s:.0f}s: {describe_rpc_error(exc)}"
                    ) from None
                time.sleep(_RETRY_S)
    finally:
        client.close()


def join_directory(
    mode: str,
    model: ModelIdentity,
    initial_peer: str | None,
    host: str,
    advertise_host: str,
    config: TransportConfig,
) -> SwarmDirectory | None:
    """This node's part in the swarm's DHT as ``--molink-dht`` says, bootstrapped from the
    initial peer's DHT address (a node without one starts a DHT of its own).

    ``on``: a peer without a DHT, or a DHT that does not start, is an error (PipelineError,
    within BOOTSTRAP_TIMEOUT_S). ``auto``: then the node goes without (None) and joins
    through its peer's registry alone, as a node started with ``off`` does; it waits for an
    unreachable peer as long as a join would. ``off``: None.
    """
    if mode == "off":
        return None
    peers: list[str] = []
    if initial_peer:
        budget_s = _DESCRIBE_BUDGET_S if mode == "on" else config.join_timeout_s
        peer_dht = peer_dht_address(initial_peer, config, budget_s)
        if not peer_dht:
            if mode == "on":
                raise PipelineError(
                    f"the initial peer {initial_peer} takes part in no DHT (it was started "
                    "with --molink-dht off)"
                )
            logger.info(
                "the initial peer %s takes part in no DHT: this node joins through it alone",
                initial_peer,
            )
            return None
        peers = [peer_dht]
    directory = SwarmDirectory(model, PROTOCOL_VERSION, config.security)
    try:
        return directory.start(host, peers, advertise_host=advertise_host)
    except PipelineError as exc:
        if mode == "on":
            raise
        logger.warning(
            "taking part in no DHT: %s. This node joins through its initial peer alone "
            "(--molink-dht on makes this an error, --molink-dht off skips the DHT)",
            exc,
        )
        return None


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
