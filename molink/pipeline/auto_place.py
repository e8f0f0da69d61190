"""A node started without layer flags picks its span from the swarm it joins.

It asks its initial peer for the swarm as that peer sees it (``GetPipeline``: the head's
registry, replicas and nodes found in the DHT included), sizes itself to its memory
(the weights it will hold for each layer, in the form it holds them, quantized or not,
experts and the embedding or LM head of a span that holds them included
(molink/placement/resident.py), plus a minimum KV reserve per layer, out of
``--molink-max-memory``
or, by default, the memory the machine has available less a quarter; on a GPU, the
device's memory times ``--gpu-memory-utilization``; a tensor-parallel stage sizes one rank
against its share: a rank holds its share of the weights and KV heads), and applies the
rule of molink/placement/placement.py, which sizes a replica by this node's measured speed
against that of the nodes it joins (molink/stage/speed.py). The choice and the reason are
logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import grpc
import torch

from molink.config import LayerRange, ModelConfig
from molink.errors import PipelineError
from molink.models.kv_cache import KVCache
from molink.models.parallel.check import rank_kv_config
from molink.models.parallel.group import rank_devices
from molink.placement.placement import ServedSpan, choose_span
from molink.placement.resident import WeightEstimate
from molink.stage.resources import host_memory
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)

MIN_KV_BLOCKS = 64  # the least KV a placed node reserves per layer, in blocks
HEADROOM = 0.25  # of the available memory, left to the rest of the process and the system
_ASK_TIMEOUT_S = 30.0


def available_memory_bytes() -> int:
    return host_memory().free_bytes


def memory_budget(
    max_memory: int | None,
    device: torch.device,
    gpu_memory_utilization: float,
    tensor_parallel_size: int = 1,
) -> int:
    """What one rank of the node's stage may fill with layers (the node's only rank unless
    it is tensor-parallel): its share of the given bytes, which are the whole node's; on
    CUDA, the smallest of the ranks' own devices (rank r runs on the r-th device from the
    stage's); on a CPU, its share of the host's memory, which every rank's process fills."""
    if max_memory is not None:
        return max_memory // tensor_parallel_size
    if device.type == "cuda":  # weights and KV live on the GPU, not in host memory
        return min(
            int(torch.cuda.mem_get_info(rank)[1] * gpu_memory_utilization)
            for rank in rank_devices(device, tensor_parallel_size)
        )
    return int(available_memory_bytes() * (1 - HEADROOM)) // tensor_parallel_size


def place(
    initial_peer: str,
    config: ModelConfig,
    dtype: torch.dtype,
    block_size: int,
    max_memory: int | None,
    transport: TransportConfig,
    weights: WeightEstimate,
    announced: Mapping[str, ServedSpan] | None = None,
    device: torch.device = torch.device("cpu"),
    gpu_memory_utilization: float = 0.9,
    layer_step_s: float = 0.0,
    tensor_parallel_size: int = 1,
) -> LayerRange:
    """``weights``: what this node holds per layer (molink.placement.resident), one rank's
    share of it when the node's stage is split across ``tensor_parallel_size`` ranks: each
    rank is then sized against its own budget, with its own share of the KV heads.
    ``announced``: node id -> span of the records in the swarm's DHT, when this node
    reads one; they cover nodes the peer's head has not admitted (other heads' nodes, nodes
    that joined elsewhere), and their throughput is the nodes' own latest measurement, their
    speed their probe's. ``layer_step_s``: this node's probe (0: not measured)."""
    from_peer = _served_spans(initial_peer, transport)
    swarm = {**from_peer, **(announced or {})}
    served = list(swarm.values())
    budget = memory_budget(max_memory, device, gpu_memory_utilization, tensor_parallel_size)
    kv_config = rank_kv_config(config, tensor_parallel_size)
    kv_reserve = KVCache.bytes_per_block(kv_config, 1, block_size, dtype) * MIN_KV_BLOCKS
    max_layers = weights.most_layers(budget, kv_reserve)
    placement = choose_span(config.num_layers, served, max_layers, layer_step_s)
    while _needed(weights, placement.start, placement.end, kv_reserve) > budget:
        # The span holds the embedding or the LM head, which the count above leaves out.
        max_layers = placement.end - placement.start - 1
        placement = choose_span(config.num_layers, served, max_layers, layer_step_s)
    logger.info(
        "placement: serving layers [%d, %d): %s (memory budget %.1f GiB, weights %.1f MiB "
        "and KV reserve %.1f MiB for the span, per rank of %d; %.3g ms per layer; "
        "swarm view: %d node(s) from %s's pipeline, %d record(s) in the DHT, %d node(s) in all)",
        placement.start,
        placement.end,
        placement.reason,
        budget / 2**30,
        weights.span_bytes(placement.start, placement.end) / 2**20,
        kv_reserve * (placement.end - placement.start) / 2**20,
        tensor_parallel_size,
        layer_step_s * 1e3,
        len(from_peer),
        initial_peer,
        len(announced or {}),
        len(swarm),
    )
    return LayerRange(placement.start, placement.end)


def _needed(weights: WeightEstimate, start: int, end: int, kv_reserve: int) -> int:
    return weights.span_bytes(start, end) + kv_reserve * (end - start)


def _served_spans(initial_peer: str, transport: TransportConfig) -> dict[str, ServedSpan]:
    client = NodeClient(initial_peer, transport)
    deadline = time.monotonic() + _ASK_TIMEOUT_S
    try:
        while True:
            try:
                pipeline = client.get_pipeline(timeout=5.0)
                break
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise PipelineError(
                        f"could not ask {initial_peer} which layers the swarm serves: "
                        f"{describe_rpc_error(exc)}"
                    ) from None
                time.sleep(0.5)
    finally:
        client.close()
    return {
        s.node_id: ServedSpan(s.layers.start, s.layers.end, s.throughput_tokens_per_s)
        for s in pipeline.stages
    }
