"""What a node checks of what arrives from other nodes: the route a Forward message
names, and the witness queries a head sends about the steps this node received."""

from __future__ import annotations

from collections.abc import Callable

from molink.errors import PipelineError, ProtocolError
from molink.pipeline.identity import NodeInfo
from molink.pipeline.wire import route_from_proto
from molink.pipeline.witness import InputWitness
from molink.placement.route import Route
from molink.transport.codec import encode_tensor
from molink.transport.generated import molink_pb2 as pb

MAX_WITNESS_QUERIES = 16  # a checked step asks for its primary and each check route


def check_route(
    request: pb.ForwardRequest,
    info: NodeInfo,
    is_head: bool,
    dropped_by: Callable[[str], frozenset[str]],
    releasing: bool = False,
) -> Route:
    """The route must be well formed, start at the sending head and name this node
    with exactly its layers, not first (the head computes its own layers), and name no
    node its head has dropped (``dropped_by(head_id)``). A release may name dropped nodes
    after this one: it is how the head frees the nodes before a lost one
    (molink.pipeline.failover), and news of the loss may reach this node first."""
    route = route_from_proto(request.route)
    problem = route.problem(info.model.num_layers)
    if problem is not None:
        raise ProtocolError(problem)
    if route.head_id != request.head_id:
        raise ProtocolError(f"route {route.key} does not start at head {request.head_id!r}")
    index = route.index_of(info.node_id)
    if index is None or index == 0:
        raise PipelineError(f"route {route.key} does not pass through stage {info.node_id}")
    hop = route.hops[index]
    if (hop.start, hop.end) != (info.layers.start, info.layers.end):
        raise ProtocolError(
            f"route {route.key} asks stage {info.node_id} for layers [{hop.start}, "
            f"{hop.end}); it serves [{info.layers.start}, {info.layers.end})"
        )
    if is_head:
        raise PipelineError(f"{info.node_id} is a head; it computes only its own steps")
    dropped = dropped_by(route.head_id)
    checked = route.hops[: index + 1] if releasing else route.hops
    stale = [hop.node_id for hop in checked if hop.node_id in dropped]
    if stale:
        raise PipelineError(
            f"route {route.key} names {', '.join(stale)}, which head {route.head_id} "
            "has dropped from its pipeline"
        )
    return route


def answer_witness(
    request: pb.WitnessRequest, store: InputWitness, hidden_size: int, max_message_bytes: int
) -> pb.WitnessResponse:
    """What this node received of the head's steps (molink.pipeline.witness); raises
    ProtocolError for a request over the limits."""
    if len(request.queries) > MAX_WITNESS_QUERIES:
        raise ProtocolError(
            f"queries: {len(request.queries)} in one witness request, at most {MAX_WITNESS_QUERIES}"
        )
    rows = sum(len(q.seq_ids) for q in request.queries)
    size = rows * hidden_size * 4
    if size > max_message_bytes:
        raise ProtocolError(
            f"seq_ids: {rows} rows would take {size} bytes, over the message limit of "
            f"{max_message_bytes}"
        )
    response = pb.WitnessResponse()
    for query in request.queries:
        kept = store.rows(request.head_id, query.step_id, query.micro_batch, list(query.seq_ids))
        answer = response.answers.add()
        if isinstance(kept, str):
            answer.missing = kept
        else:
            encode_tensor(kept, "float32", answer.rows)
    return response
