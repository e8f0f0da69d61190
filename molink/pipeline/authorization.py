"""Who may ask a node for what, decided from the caller's certificate identity.

Rules, for a caller authenticated by mutual TLS (``molink.security``); a node in open mode
has no caller identity and trusts every caller, as it trusts its network:

* a join names the caller itself (a node cannot register another node's id);
* a pipeline update comes only from that pipeline's head;
* a step or an in-stream release for head H comes from H itself, or from the node just
  before this one on the route the message carries (which starts at H) when that route
  bears H's signature (molink.security.route_seal): the sender writes the route, so
  without it any member could name itself the node before this one. A stage keys
  sequences by (head id, sequence id), so nobody else can touch H's sequences;
* a unary release for head H comes only from H;
* what a node received of head H's steps (molink.pipeline.witness) is told only to H;
* a head takes sampled tokens only from the last node of the route it chose for that step,
  and error reports only from the nodes of that route; a report that no room was left
  names its sender, one that a step could not be delivered names the hop after it;
* the timings a result's trace carries are taken only when they name the nodes of that
  step's route, in order (the head keeps and exports an estimate per node named).

Each check returns None when the call is allowed, else the reason it is not.
"""

from __future__ import annotations

from collections.abc import Callable

from molink.placement.route import Route
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


def check_witness(caller: str | None, head_id: str) -> str | None:
    if caller is None or caller == head_id:
        return None
    return f"only head {head_id!r} may ask what its steps carried, not node {caller}"


def check_forward(
    caller: str | None,
    route: Route,
    node_id: str,
    seal_problem: Callable[[Route], str | None],
) -> str | None:
    """``route``: the route the message carries (its first hop is its head);
    ``seal_problem``: why the route does not bear its head's valid signature, or None."""
    if caller is None or caller == route.head_id:
        return None
    index = route.index_of(node_id)
    if index is None or index == 0:
        return f"node {node_id} is not a node after the head on route {route.key}"
    previous = route.hops[index - 1].node_id
    if caller != previous:
        return (
            f"steps on route {route.key} reach node {node_id} from node {previous}, "
            f"not from node {caller}"
        )
    problem = seal_problem(route)
    if problem is None:
        return None
    return f"node {caller} passed on a route its head did not sign: {problem}"


def check_result(
    caller: str | None, request: pb.ReturnResultsRequest, route: Route | None
) -> str | None:
    """``route``: the route the head chose for the step, None if it knows no such step."""
    if caller is None:
        return None
    if route is None:
        return f"no step {request.result.step_id} of this head is in flight"
    ids = [hop.node_id for hop in route.hops]
    if request.result.HasField("error"):
        if caller in ids:
            return _blame_refusal(caller, request.result, route)
        return f"node {caller} is not on route {route.key}"
    if len(ids) > 1 and caller == ids[-1]:
        return None
    return f"results of steps on route {route.key} come from node {ids[-1]}, not from node {caller}"


def _blame_refusal(caller: str, result: pb.StepResult, route: Route) -> str | None:
    """The head avoids the node a KV_FULL or UNREACHABLE report names: a node reports no
    room of its own, and a failed delivery to the hop after it, never another member."""
    blamed = result.failed_node_id
    if not blamed:
        return None
    if result.failure_kind == pb.FAILURE_KIND_KV_FULL:
        allowed = caller
    elif result.failure_kind == pb.FAILURE_KIND_UNREACHABLE:
        after = route.next_after(caller)
        allowed = after.node_id if after is not None else ""
    else:
        return None
    if blamed == allowed:
        return None
    return (
        f"node {caller} blames node {blamed}; it can report this failure only of "
        f"{allowed or 'no node'}"
    )


def trace_problem(trace: list[pb.HopTrace], route: Route, complete: bool) -> str | None:
    """Why a result's ``trace`` does not describe ``route`` (None: it does, one entry per
    hop in the route's order; all of them when ``complete``, else the hops a failed step
    got through). Each hop adds its own entry and passes on the others, so the last node
    writes them all; naming nodes off the route would make the head keep estimates, and
    export metrics, for any ids it chose."""
    named = [hop.node_id for hop in trace]
    expected = [hop.node_id for hop in route.hops]
    if named == expected or (not complete and named == expected[: len(named)]):
        return None
    shown = ", ".join(named[:8]) + (" ..." if len(named) > 8 else "")
    return f"its trace names [{shown}], not the nodes of route {route.key}"
