"""Node records, pipeline views and measurements <-> their proto messages."""

from __future__ import annotations

from molink.config import LayerRange
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.registry import PipelineView
from molink.placement.route import Route, RouteHop, RouteSeal
from molink.transport.generated import molink_pb2 as pb


def node_to_proto(node: NodeInfo) -> pb.NodeInfo:
    return pb.NodeInfo(
        node_id=node.node_id,
        model=pb.ModelIdentity(
            served_name=node.model.served_name,
            fingerprint=node.model.fingerprint,
            num_layers=node.model.num_layers,
            hidden_size=node.model.hidden_size,
            vocab_size=node.model.vocab_size,
        ),
        layers=pb.LayerSpan(start=node.layers.start, end=node.layers.end),
        num_kv_blocks=node.num_kv_blocks,
        block_size=node.block_size,
        dtype=node.dtype,
        wire_dtype=node.wire_dtype,
        protocol_version=node.protocol_version,
        address=node.address,
        public_key=node.public_key,
        free_kv_blocks=node.free_kv_blocks,
        throughput_tokens_per_s=node.throughput_tokens_per_s,
        dht_address=node.dht_address,
        device=node.device,
        memory_total_bytes=node.memory_total_bytes,
        memory_free_bytes=node.memory_free_bytes,
        layer_step_s=node.layer_step_s,
    )


def node_from_proto(msg: pb.NodeInfo) -> NodeInfo:
    return NodeInfo(
        node_id=msg.node_id,
        model=ModelIdentity(
            served_name=msg.model.served_name,
            fingerprint=msg.model.fingerprint,
            num_layers=msg.model.num_layers,
            hidden_size=msg.model.hidden_size,
            vocab_size=msg.model.vocab_size,
        ),
        layers=LayerRange(msg.layers.start, msg.layers.end),
        address=msg.address,
        num_kv_blocks=msg.num_kv_blocks,
        block_size=msg.block_size,
        dtype=msg.dtype,
        wire_dtype=msg.wire_dtype,
        protocol_version=msg.protocol_version,
        public_key=msg.public_key,
        free_kv_blocks=msg.free_kv_blocks,
        throughput_tokens_per_s=msg.throughput_tokens_per_s,
        dht_address=msg.dht_address,
        device=msg.device,
        memory_total_bytes=msg.memory_total_bytes,
        memory_free_bytes=msg.memory_free_bytes,
        layer_step_s=msg.layer_step_s,
    )


def view_to_proto(view: PipelineView) -> pb.Pipeline:
    return pb.Pipeline(
        head_id=view.head_id,
        head_address=view.head_address,
        epoch=view.epoch,
        stages=[node_to_proto(s) for s in view.stages],
        num_layers=view.num_layers,
        missing=[pb.LayerSpan(start=r.start, end=r.end) for r in view.missing_ranges()],
        readiness=view.readiness() or "",
    )


def view_from_proto(msg: pb.Pipeline) -> PipelineView:
    """``missing`` and ``readiness`` are derived, so they are recomputed, not trusted."""
    return PipelineView(
        head_id=msg.head_id,
        head_address=msg.head_address,
        epoch=msg.epoch,
        num_layers=msg.num_layers,
        stages=tuple(node_from_proto(s) for s in msg.stages),
    )


def link_to_proto(
    head_id: str, from_node_id: str, to_node_id: str, estimate: LinkEstimate
) -> pb.LinkReport:
    return pb.LinkReport(
        head_id=head_id,
        from_node_id=from_node_id,
        to_node_id=to_node_id,
        bandwidth_bytes_per_s=estimate.bandwidth_bytes_per_s,
        rtt_s=estimate.rtt_s,
        samples=estimate.samples,
    )


def link_from_proto(msg: pb.LinkReport) -> LinkEstimate:
    return LinkEstimate(
        hop=f"{msg.from_node_id}->{msg.to_node_id}",
        bandwidth_bytes_per_s=msg.bandwidth_bytes_per_s,
        rtt_s=msg.rtt_s,
        samples=msg.samples,
    )


def timing_to_proto(timing: StageTiming) -> pb.StageTimingReport:
    return pb.StageTimingReport(
        node_id=timing.node_id,
        compute_s_per_step=timing.compute_s_per_step,
        compute_s_per_token=timing.compute_s_per_token,
        samples=timing.samples,
    )


def timing_from_proto(msg: pb.StageTimingReport) -> StageTiming:
    return StageTiming(
        node_id=msg.node_id,
        compute_s_per_step=msg.compute_s_per_step,
        compute_s_per_token=msg.compute_s_per_token,
        samples=msg.samples,
    )


def route_to_proto(route: Route, seal: RouteSeal | None = None) -> pb.Route:
    """``seal``: the head's signature to send; by default the one ``route`` came with."""
    msg = pb.Route(
        hops=[
            pb.RouteHop(
                node_id=hop.node_id,
                address=hop.address,
                layers=pb.LayerSpan(start=hop.start, end=hop.end),
            )
            for hop in route.hops
        ],
        head_address=route.head_address,
    )
    seal = seal or route.seal
    if seal is not None:
        msg.seal.CopyFrom(
            pb.RouteSeal(version=seal.version, public_key=seal.public_key, signature=seal.signature)
        )
    return msg


def route_from_proto(msg: pb.Route) -> Route:
    """Structure only; a node checks with ``Route.problem`` that the route makes sense, and
    with molink.security.route_seal that its head signed it."""
    seal = None
    if msg.HasField("seal"):
        seal = RouteSeal(msg.seal.version, msg.seal.public_key, msg.seal.signature)
    return Route(
        hops=tuple(
            RouteHop(hop.node_id, hop.address, hop.layers.start, hop.layers.end) for hop in msg.hops
        ),
        head_address=msg.head_address,
        seal=seal,
    )
