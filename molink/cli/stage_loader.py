"""Loading this node's stage and describing it to its peers, from the --molink-* flags.

Every node, head or not, loads its layers the same way: it measures (or reads) how fast a
decoder layer runs, picks its span (its layer flags, or what the swarm needs most), loads
that slice with its KV blocks, and builds the ``NodeInfo`` record that it announces: its
address as peers dial it, its public key, its memory and its speed. What a node then
starts (a head or a stage) is molink/cli/pipeline_builder.py's business.
"""

from __future__ import annotations

import dataclasses
import logging
import socket

import torch
from cryptography.hazmat.primitives import serialization

from molink.cli.args import EngineArgs
from molink.config import LayerRange, ModelConfig
from molink.device import resolve_device
from molink.discovery.dht import SwarmDirectory
from molink.discovery.setup import (
    announced_spans,
)
from molink.engine.factory import (
    EngineOptions,
    dtype_name,
    follower_settings,
    graph_settings,
    kv_cache_dtype_for,
    last_stage_grammars,
    num_blocks_for,
    profiled_num_blocks,
    profiles_kv_memory,
    resolve_max_model_len,
    torch_dtype_for,
)
from molink.models.parallel.check import rank_kv_config
from molink.parallel.stage import load_stage_slice
from molink.pipeline.auto_place import place
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.placement.resident import estimate_weights, held_as
from molink.security.credentials import SwarmCredentials
from molink.security.identity import NodeIdentity
from molink.stage.resources import device_of, memory_of
from molink.stage.speed import PROBE_TOKENS, layer_step_seconds
from molink.stage.worker import StageWorker
from molink.transport.config import TransportConfig
from molink.weights import ModelSource

logger = logging.getLogger(__name__)


def advertise_host(args: EngineArgs) -> str:
    if args.molink_advertise_host:
        return args.molink_advertise_host
    if args.host not in ("0.0.0.0", "::", ""):
        return args.host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def advertise_port(args: EngineArgs) -> int:
    """The port peers dial: a forwarder (NAT, proxy, link emulator) may sit in front of the
    port this node binds, so the two can differ."""
    if args.molink_advertise_port is not None:
        return args.molink_advertise_port
    return args.molink_grpc_port


def wire_dtype(args: EngineArgs, dtype: torch.dtype) -> str:
    return dtype_name(dtype) if args.molink_wire_dtype == "auto" else args.molink_wire_dtype


def node_info(
    args: EngineArgs,
    source: ModelSource,
    worker: StageWorker,
    num_blocks: int,
    dtype: torch.dtype,
    credentials: SwarmCredentials | None = None,
) -> NodeInfo:
    """Every node has a key pair, and its public key travels in its records. A swarm
    member is named by its key; an open node keeps its address as its id (its key is made
    at start and vouched for by no authority, and peers reach and name it by address)."""
    address = f"{advertise_host(args)}:{advertise_port(args)}"
    device = device_of(worker.model)
    memory = memory_of(device)
    return NodeInfo(
        node_id=credentials.node_id if credentials else address,
        model=ModelIdentity.from_model_config(args.model_name, source.model_config),
        layers=worker.layer_range,
        address=address,
        num_kv_blocks=num_blocks,
        block_size=args.block_size,
        dtype=dtype_name(dtype),
        wire_dtype=wire_dtype(args, dtype),
        public_key=public_key_of(credentials.identity if credentials else NodeIdentity.generate()),
        free_kv_blocks=num_blocks,
        device=device,
        memory_total_bytes=memory.total_bytes,
        memory_free_bytes=memory.free_bytes,
    )


def public_key_of(identity: NodeIdentity) -> bytes:
    return identity.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_stage(
    args: EngineArgs,
    options: EngineOptions,
    source: ModelSource,
    credentials: SwarmCredentials | None = None,
    transport: TransportConfig | None = None,
    directory: SwarmDirectory | None = None,
) -> tuple[StageWorker, NodeInfo, torch.dtype]:
    device = resolve_device(options.device)
    config = source.model_config
    dtype = torch_dtype_for(source, options.dtype, device, options.quantization)
    kv_dtype = kv_cache_dtype_for(source, options, dtype, device)
    # Known before placement (which sizes a replica by it) and announced in the record.
    step_s = node_layer_step_seconds(args, config, dtype, device)
    layers = stage_layers(args, options, source, dtype, device, transport, directory, step_s)
    kv_config = rank_kv_config(config, options.tensor_parallel_size)
    max_model_len = resolve_max_model_len(config, options.max_model_len)
    profile = profiles_kv_memory(options, device)
    # Profiled: sized after loading; otherwise before (tensor-parallel ranks load with it).
    num_blocks = 0 if profile else num_blocks_for(kv_config, layers, options, kv_dtype)
    model = load_stage_slice(
        source,
        layers,
        dtype_name(dtype),
        options.quantization,
        options.tensor_parallel_size,
        follower_settings(options, layers, dtype, num_blocks, kv_dtype),
        device,
        batch_kernel=options.quantized_batch_kernel,
    )
    if profile:
        num_blocks = profiled_num_blocks([model], options, kv_dtype, max_model_len, device)
    grammars = last_stage_grammars(source, layers)
    # A head's own layers use its scheduler's blocks; any other node allocates its own.
    worker = StageWorker(
        model,
        config,
        layers,
        num_blocks,
        options.block_size,
        kv_dtype,
        grammars,
        owns_blocks=layers.start != 0,
        kv_config=kv_config,
        graphs=graph_settings(options, max_model_len, device),
    )
    info = node_info(args, source, worker, num_blocks, dtype, credentials)
    return worker, dataclasses.replace(info, layer_step_s=step_s), dtype


def node_layer_step_seconds(
    args: EngineArgs, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> float:
    """The operator's figure (--molink-layer-step-ms) or the probe's, logged either way."""
    if args.molink_layer_step_ms is not None:
        step_s, origin = args.molink_layer_step_ms / 1e3, "as configured"
    else:
        step_s, origin = layer_step_seconds(config, dtype, device), "measured"
    logger.info(
        "speed: one decoder layer takes %.3g ms for a %d-token step on %s (%s)",
        step_s * 1e3,
        PROBE_TOKENS,
        device,
        origin,
    )
    return step_s


def stage_layers(
    args: EngineArgs,
    options: EngineOptions,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    transport: TransportConfig | None,
    directory: SwarmDirectory | None,
    step_s: float,
) -> LayerRange:
    """The node's span: its layer flags when given, else what the swarm needs most, sized by
    its memory and speed (``step_s``: its measured seconds per layer)."""
    config = source.model_config
    if args.molink_auto_place and args.molink_initial_peer:
        # No layer flags: take the span the swarm needs most (explicit flags always win).
        return place(
            args.molink_initial_peer,
            config,
            dtype,
            options.block_size,
            args.molink_max_memory,
            transport or TransportConfig(),
            estimate_weights(
                source,
                held_as(
                    source,
                    options.quantization,
                    dtype,
                    device,
                    options.quantized_batch_kernel,
                    options.tensor_parallel_size,
                ),
            ),
            announced_spans(directory) if directory is not None else None,
            device,
            options.gpu_memory_utilization,
            layer_step_s=step_s,
            tensor_parallel_size=options.tensor_parallel_size,
        )
    return LayerRange.resolve(args.molink_start_layer, args.molink_end_layer, config.num_layers)
