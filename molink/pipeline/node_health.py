"""A node's answer to Health: its state, counters, outgoing links and free KV blocks."""

from __future__ import annotations

import time

from molink.kv_cache.stage_pool import StageBlockPool
from molink.pipeline.links import LinkTable
from molink.pipeline.registry import PipelineView
from molink.pipeline.wire import link_to_proto
from molink.pipeline.worker import ComputeWorker
from molink.transport.generated import molink_pb2 as pb


def health_response(
    node_id: str,
    view: PipelineView | None,
    worker: ComputeWorker,
    links: LinkTable,
    counters: tuple[int, int],
    started_at: float,
    block_pool: StageBlockPool | None,
) -> pb.HealthResponse:
    """``counters``: bytes received and steps rejected by the node's own checks."""
    message = worker.stall_message
    if view is None:
        message = message or "not part of any pipeline"
    received, rejected = counters
    return pb.HealthResponse(
        status=pb.HEALTH_STATUS_DEGRADED if message else pb.HEALTH_STATUS_SERVING,
        message=message or "",
        steps_processed=worker.steps_processed,
        steps_rejected=rejected + worker.steps_failed,
        bytes_sent=links.bytes_sent(),
        bytes_received=received,
        queued_steps=worker.queued,
        active_sequences=worker.active_sequences,
        pipeline_epoch=view.epoch if view else 0,
        uptime_s=time.monotonic() - started_at,
        throughput_tokens_per_s=worker.throughput.tokens_per_s,
        links=[
            link_to_proto(out.head_id, node_id, out.to_node_id, out.estimate)
            for out in links.outgoing()
        ],
        **_kv_health(block_pool),
    )


def _kv_health(pool: StageBlockPool | None) -> dict:
    if pool is None:
        return {}
    return {
        "total_kv_blocks": pool.num_blocks,
        "free_kv_blocks": pool.num_free,
        "heads": [
            pb.HeadUsage(head_id=u.head_id, sequences=u.sequences, kv_blocks=u.blocks)
            for u in pool.usage()
        ],
    }
