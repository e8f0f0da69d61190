"""A stage reads the counts of a received plan off the message before it builds anything
from it: every id of a repeated field becomes a Python object several times its wire
size, so a head (any member can be one) could otherwise make a stage build millions of
them from one message before the plan's counts were checked. The ids a plan declares
witnessed are bounded as well (they were not)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from molink.errors import ProtocolError
from molink.pipeline import node as node_module
from molink.pipeline.wire import route_to_proto
from molink.transport.codec import encode_tensor
from molink.transport.convert import plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import PlanLimits, check_plan_message, validate_plan
from tests.helpers.toy_swarm import CONFIG, MODEL, prefill, toy_swarm

LIMITS = PlanLimits(
    vocab_size=1000,
    max_seqs_per_step=4,
    max_tokens_per_step=16,
    max_tokens_per_sequence=8,
    max_blocks_per_step=4,
    max_stop_strings=2,
)


def _message(**changes: object) -> pb.StepPlan:
    msg = plan_to_proto(prefill(1, 5))
    for name, value in changes.items():
        getattr(msg, name).extend(value)  # type: ignore[arg-type]
    return msg


@pytest.mark.parametrize(
    ("msg", "named"),
    [
        (_message(finished_seq_ids=range(5)), "finished ids: 5 exceeds the limit of 4"),
        (_message(token_ids=range(14)), "token ids: 17 exceeds the limit of 16"),
    ],
)
def test_plan_counts_are_read_off_the_message(msg: pb.StepPlan, named: str) -> None:
    with pytest.raises(ProtocolError, match=named):
        check_plan_message(msg, LIMITS)
    check_plan_message(_message(), LIMITS)


def test_long_lists_of_a_new_sequence_are_refused_before_conversion() -> None:
    msg = _message()
    msg.new_sequences[0].token_ids.extend(range(6))
    with pytest.raises(ProtocolError, match="new sequence 5: tokens: 9 exceeds the limit of 8"):
        check_plan_message(msg, LIMITS)
    msg = _message()
    msg.new_sequences[0].sampling.stop_token_ids.extend(range(2000))
    with pytest.raises(ProtocolError, match="stop token ids: 2000 exceeds the limit"):
        check_plan_message(msg, LIMITS)
    msg = _message()
    msg.witness.seq_ids.extend(range(5))
    with pytest.raises(ProtocolError, match="witnessed sequences: 5 exceeds the limit of 4"):
        check_plan_message(msg, LIMITS)


def test_witnessed_ids_of_a_plan_are_bounded() -> None:
    plan = dataclasses.replace(prefill(1, 5), witness_seq_ids=tuple(range(5)))
    with pytest.raises(ProtocolError, match="witnessed sequences: 5 exceeds the limit of 4"):
        validate_plan(plan, LIMITS)


def test_a_stage_refuses_a_plan_over_its_counts_without_building_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = dataclasses.replace(CONFIG, max_tokens_per_step=16)
    with toy_swarm((("n", 1, 4),), config) as swarm:
        head, stage = swarm.head, swarm.nodes["n"]
        built: list[object] = []
        monkeypatch.setattr(node_module, "plan_from_proto", built.append)
        request = pb.ForwardRequest(head_id=head.head_id, sender_id="h")
        route = head.routes.route_for_new(3)
        assert route is not None
        request.route.CopyFrom(route_to_proto(route))
        request.step.plan.CopyFrom(_message(token_ids=range(14)))
        request.step.hidden.CopyFrom(encode_tensor(torch.zeros(3, MODEL.hidden_size), "float32"))
        ack = stage.handle_forward(request, request.ByteSize(), None)
        assert "token ids: 17 exceeds the limit of 16" in ack.error
        assert not built


def test_a_stage_refuses_more_trace_entries_than_hops_before_it() -> None:
    with toy_swarm((("n", 1, 4),)) as swarm:
        head, stage = swarm.head, swarm.nodes["n"]
        request = pb.ForwardRequest(head_id=head.head_id, sender_id="h")
        route = head.routes.route_for_new(3)
        assert route is not None
        request.route.CopyFrom(route_to_proto(route))
        request.step.plan.CopyFrom(_message())
        request.step.hidden.CopyFrom(encode_tensor(torch.zeros(3, MODEL.hidden_size), "float32"))
        request.step.trace.add(node_id="h")  # the head's own entry: n is hop 1
        assert not stage.handle_forward(request, request.ByteSize(), None).error
        request.step.plan.step_id = 2
        request.step.plan.new_sequences[0].seq_id = 6
        request.step.plan.scheduled[0].seq_id = 6
        request.step.trace.add(node_id="x")
        ack = stage.handle_forward(request, request.ByteSize(), None)
        assert "2 trace entries for the 1 hop(s) before node n" in ack.error
