"""Starting a node of a pipeline from the command line's --molink-* flags.

The node holding layer 0 is the head: it runs the scheduler and the API and computes its
own layers; every other node is a stage that joins through --molink-initial-peer. Every
node owns its KV blocks: the head's scheduler allocates only the head's own, and other
nodes allocate for the sequences they are sent. The head's prefill budget and
micro-batch count follow what its telemetry measures.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from molink.cli.args import EngineArgs
from molink.cli.security_args import swarm_key_of
from molink.cli.stage_loader import advertise_host, load_stage
from molink.device import resolve_device
from molink.discovery.dht import SwarmDirectory
from molink.discovery.setup import (
    announce_stage,
    join_directory,
    watch_and_announce_head,
)
from molink.engine.async_engine import AsyncLLMEngine
from molink.engine.factory import (
    EngineOptions,
    build_scheduler,
    model_source,
    resolve_max_model_len,
)
from molink.engine.llm_engine import LLMEngine
from molink.engine.microbatch_controller import MicroBatchController
from molink.engine.pacing import PipelinePacer
from molink.engine.recovery import UnservedTimer
from molink.engine.telemetry import PipelineTelemetry
from molink.engine.transmission import TransmissionConfig, TransmissionScheduler
from molink.outputs import RequestOutput
from molink.pipeline.head import PipelineExecutor
from molink.pipeline.identity import ModelIdentity, NodeInfo, format_range
from molink.pipeline.node import StageNode
from molink.pipeline.stage_client import StageOnlyClient
from molink.progress.waiting import Coverage, PipelineWaitStatus
from molink.security.node_setup import grpc_bind_host, node_credentials
from molink.stage.worker import StageWorker
from molink.tokenizer.tokenizer import Tokenizer
from molink.transport.config import TransportConfig
from molink.weights import ModelSource

logger = logging.getLogger(__name__)


def build_pipeline_engine(args: EngineArgs, options: EngineOptions):
    """The head (start layer 0) gets an AsyncLLMEngine; any other node a StageOnlyClient."""
    credentials = node_credentials(swarm_key_of(args))
    transport = TransportConfig(security=credentials, lease_s=args.molink_lease_timeout)
    host = grpc_bind_host(args.host, advertise_host(args), credentials is not None)
    bind = f"{host}:{args.molink_grpc_port}"
    resolve_device(options.device)  # a device this machine lacks fails before any loading
    source = model_source(options)
    model = ModelIdentity.from_model_config(args.model_name, source.model_config)

    def join_dht() -> SwarmDirectory | None:
        return join_directory(
            args.molink_dht, model, args.molink_initial_peer, host, advertise_host(args), transport
        )

    # A node that picks its own layers reads the swarm from the DHT before loading; any
    # other joins it once loaded, so that it waits for a peer still loading its own
    # weights as long as the join itself would.
    directory = join_dht() if args.molink_auto_place else None
    try:
        worker, info, dtype = load_stage(args, options, source, credentials, transport, directory)
        if not args.molink_auto_place:
            directory = join_dht()
    except BaseException:
        if directory is not None:
            directory.shutdown()
        raise
    if directory is not None:
        info = dataclasses.replace(info, dht_address=directory.address)
    if info.layers.start != 0:
        return _start_stage(args, source, worker, info, dtype, bind, transport, directory)
    head = PipelineExecutor(
        worker,
        info,
        transport,
        bind_address=bind,
        input_dtype=dtype,
        verify_fraction=args.molink_verify_fraction,
    )
    head.start()
    PipelineWaitStatus(lambda: pipeline_coverage(head)).start()
    logger.info(
        "head gRPC address: %s (stages join with --molink-initial-peer %s)",
        info.address,
        info.address,
    )
    tokenizer = Tokenizer.from_dir(source.tokenizer_dir)
    config = source.model_config
    max_model_len = resolve_max_model_len(config, options.max_model_len)
    eos = tuple(sorted(set(config.eos_token_ids) | set(tokenizer.eos_token_ids)))
    # A prefix hit would name KV that only the head holds: other nodes own their blocks
    # and compute every sequence from its first token.
    options = dataclasses.replace(options, enable_prefix_caching=False)
    scheduler = build_scheduler(options, info.num_kv_blocks, max_model_len, eos)
    if directory is not None:
        kv = scheduler.kv
        watch_and_announce_head(head, directory, args.molink_dht_ttl, lambda: kv.num_free_blocks)
    telemetry: PipelineTelemetry = head  # the head measures its own pipeline
    transmission = TransmissionScheduler(
        TransmissionConfig(enabled=args.molink_transmission_scheduling == "on"), telemetry
    )
    pacer = PipelinePacer(transmission)
    engine = LLMEngine(
        scheduler,
        head,
        tokenizer,
        num_micro_batches=1,
        pacer=pacer,
        router=head.routes,
        recovery=head,
        vocab_size=config.vocab_size,
    )
    controller = MicroBatchController(telemetry, pinned=args.molink_micro_batches)
    sizer = PipelineSizer(
        engine, head, controller, pacer, UnservedTimer(args.molink_failover_timeout)
    )
    return AsyncLLMEngine(
        engine, args.model_name, max_model_len, maintenance=sizer, metric_lines=head.metric_lines
    )


def pipeline_coverage(head: PipelineExecutor) -> Coverage:
    """How many layers the head's pipeline covers, and which are missing (for the status line)."""
    view = head.pipeline()
    missing = view.missing_ranges()
    uncovered = sum(r.end - r.start for r in missing)
    spans = ", ".join(format_range(r) for r in missing) or None
    return Coverage(view.num_layers - uncovered, view.num_layers, spans)


class PipelineSizer:
    """Keeps the micro-batch count and prefill pacing in line with the pipeline.

    Called by the engine thread before each step. When the set of nodes changes and every
    layer is served, K restarts from the length of the route new sequences take; then
    every call lets the transmission scheduler and the micro-batch controller follow the
    telemetry (each throttles itself). The head's block pool is its own and never changes.
    While some layers have no node, requests wait for one up to the failover timeout, then
    end with a 503 naming the missing layers.
    """

    def __init__(
        self,
        engine: LLMEngine,
        head: PipelineExecutor,
        controller: MicroBatchController,
        pacer: PipelinePacer,
        unserved: UnservedTimer | None = None,
    ) -> None:
        self.engine = engine
        self.head = head
        self.controller = controller
        self.pacer = pacer
        self.unserved = unserved or UnservedTimer(30.0)
        self._epoch = -1

    def __call__(self) -> list[RequestOutput]:
        view = self.head.pipeline()
        if view.epoch == self._epoch:
            self._adapt()
            return []
        readiness = self.head.readiness()
        expired = self.unserved.expired(readiness, self.engine.has_unfinished_requests())
        if expired is not None:
            logger.error("failing the requests that wait for a route: %s", expired)
            return self.engine.fail_all(expired, status=503)
        if readiness is not None:
            return []
        route_length = len(self.head.route_nodes())
        micro_batches = self.controller.reset(route_length)
        self.engine.set_num_micro_batches(micro_batches)
        self.pacer.transmission.refresh(force=True)
        self._epoch = view.epoch
        logger.info(
            "pipeline ready: %d nodes, routes of %d, %d micro-batches in flight",
            len(view.stages),
            route_length,
            micro_batches,
        )
        return []

    def _adapt(self) -> None:
        self.pacer.transmission.refresh()
        micro_batches = self.controller.update(
            self.pacer.mean_plan_tokens, self.engine.scheduler.num_running
        )
        if micro_batches != self.engine.num_micro_batches:
            self.engine.set_num_micro_batches(micro_batches)


def _start_stage(
    args: EngineArgs,
    source: ModelSource,
    worker: StageWorker,
    info: NodeInfo,
    dtype: torch.dtype,
    bind: str,
    transport: TransportConfig,
    directory: SwarmDirectory | None,
) -> StageOnlyClient:
    node = StageNode(
        worker,
        info,
        transport,
        bind_address=bind,
        initial_peer=args.molink_initial_peer,
        input_dtype=dtype,
        block_pool=worker.block_pool,
    )
    node.start()  # joins through the initial peer, retrying while it is unreachable
    if directory is not None:
        announce_stage(node, directory, args.molink_dht_ttl, worker.block_pool)
    logger.info("stage %s serves layers [%d, %d)", info.address, info.layers.start, info.layers.end)
    max_model_len = resolve_max_model_len(source.model_config, args.max_model_len)
    return StageOnlyClient(node, info, Tokenizer.from_dir(source.tokenizer_dir), max_model_len)
