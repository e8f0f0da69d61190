"""Who may ask a node for what, decided from the caller's certificate identity.

Rules, for a caller authenticated by mutual TLS (``molink.security``); a node in open mode
has no caller identity and trusts every caller, as it trusts its network:

* a join names the caller itself (a node cannot register another node's id);
* a pipeline update comes only from that pipeline's head;
* a step or an in-stream release for head H comes from H itself or from the stage just
  before this node on H's pipeline (the node H's route sends it through); a stage keys
  sequences by (head id, sequence id), so nobody else can touch H's sequences;
* a unary release for head H comes only from H;
* a head takes sampled tokens only from the last stage of its pipeline, and error reports
  only from its stages.

Each check returns None when the call is allowed, else the reason it is not.
"""

from __future__ import annotations

from molink.pipeline.registry import PipelineView
from molink.transport.generated import molink_pb2 as pb


def check_join(caller: str | None, request: pb.JoinRequest) -> str | None:
    if caller is None or request.node.node_id == caller:
        return None
    return (
        f"a node joins under its own id: this call's certificate is node {caller}, "
        f"the request names {request.node.node_id!r}"
    )


def check_update(caller: str | None, request: pb.Pipeline) -> str | None:
    if caller is None or caller == request.head_id:
        return None
    return f"only head {request.head_id!r} may update its pipeline, not node {caller}"


def check_release(caller: str | None, head_id: str) -> str | None:
    if caller is None or caller == head_id:
        return None
    return f"only head {head_id!r} may release its sequences, not node {caller}"


def check_forward(
    caller: str | None, head_id: str, node_id: str, view: PipelineView | None
) -> str | None:
    """``view``: head ``head_id``'s pipeline as node ``node_id`` knows it."""
    if caller is None or caller == head_id:
        return None
    if view is None:
        return f"node {node_id} is not part of head {head_id!r}'s pipeline"
    ids = [stage.node_id for stage in view.stages]
    if node_id in ids and ids.index(node_id) > 0:
        previous = ids[ids.index(node_id) - 1]
        if caller == previous:
            return None
        return (
            f"steps of head {head_id!r} reach node {node_id} from node {previous} "
            f"(epoch {view.epoch}), not from node {caller}"
        )
    return f"node {node_id} is not a stage after the head in head {head_id!r}'s pipeline"


def check_result(
    caller: str | None, request: pb.ReturnResultsRequest, view: PipelineView | None
) -> str | None:
    if caller is None:
        return None
    if view is None:
        return "this node is not a head"
    ids = [stage.node_id for stage in view.stages]
    if request.result.HasField("error"):
        if caller in ids:
            return None
        return f"node {caller} is not a stage of head {view.head_id}'s pipeline"
    if ids and caller == ids[-1] and len(ids) > 1:
        return None
    return (
        f"results of head {view.head_id}'s steps come from its last stage "
        f"({ids[-1] if ids else 'none'}), not from node {caller}"
    )
