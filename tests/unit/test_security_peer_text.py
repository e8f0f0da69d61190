"""Text a peer sends that a node keeps, logs or passes on to users (a step's error, a
sampled token's error, a refusal in an acknowledgement) is cut to MAX_PEER_TEXT_CHARS
and carries no terminal escapes or other control characters (line breaks and tabs of
multi-line errors stay)."""

from __future__ import annotations

import torch

from molink.pipeline.outbound import OutboundStep, SenderFactory, StepError
from molink.placement.route import Route, RouteHop
from molink.security.peer_text import MAX_PEER_TEXT_CHARS, peer_text
from molink.step import FailureKind, StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.transport.convert import result_from_proto
from molink.transport.generated import molink_pb2 as pb

LONG = "\x1b[2J\x07" + "x" * 100_000


def _clean(text: str) -> bool:
    return all(c.isprintable() or c in "\n\t" for c in text)


def test_peer_text_is_cut_and_printable() -> None:
    text = peer_text(LONG)
    assert len(text) <= MAX_PEER_TEXT_CHARS + 40 and _clean(text)
    assert text.endswith(f"({len(LONG)} characters in all)")
    assert peer_text("stage s failed:\n  Traceback\tx") == "stage s failed:\n  Traceback\tx"


def test_a_results_errors_from_a_peer_are_cut_and_printable() -> None:
    wire = pb.StepResult(step_id=1, error=LONG, failure_kind=pb.FAILURE_KIND_REJECTED)
    wire.sampled.add(seq_id=3, token_id=5, error=LONG)
    result = result_from_proto(wire)
    assert result.error is not None and _clean(result.error)
    assert len(result.error) <= MAX_PEER_TEXT_CHARS + 40
    (token,) = result.sampled
    assert token.error is not None and _clean(token.error)
    assert len(token.error) <= MAX_PEER_TEXT_CHARS + 40
    assert result.failure_kind is FailureKind.REJECTED
    plain = result_from_proto(pb.StepResult(step_id=2, error="stage s1 failed"))
    assert plain == StepResult(
        step_id=2, micro_batch=0, error="stage s1 failed", failure_kind=FailureKind.NONE
    )


def test_a_refusal_in_an_acknowledgement_is_cut_and_printable() -> None:
    reported: list[StepError] = []
    factory = SenderFactory("h", "float32", TransportConfig(), reported.append, is_head=True)
    route = Route((RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 4)), "x:1")
    plan = StepPlan(4, (), ())
    step = OutboundStep("h", route, plan, torch.zeros(0, 2), [])
    factory._forward_acked(step, pb.ForwardAck(step_id=4, error=LONG))
    (error,) = reported
    assert _clean(error.message) and len(error.message) <= MAX_PEER_TEXT_CHARS + 40
    assert (error.kind, error.node_id) == (FailureKind.REJECTED, "s")
