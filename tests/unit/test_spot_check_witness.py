"""Stages keep input rows only for the sequences the head declares checked: with no spot
checks a step costs the witness store nothing; with checks, the checked sequences' rows are
kept (and a liar is still caught: test_spot_checks_pipeline.py), no other sequence's; a plan
from an older head, which declares nothing, keeps every row as before."""

from __future__ import annotations

import random

import pytest
import torch

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.head_spot_checks import HeadSpotChecks
from molink.pipeline.mirroring import SHADOW_OFFSET
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.pipeline.witness import InputWitness
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_from_proto, plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.polling import first_result, wait_until

MODEL = toy_identity(3, vocab_size=1024)
GREEDY = SamplingParams(temperature=0.0)


def _plan(step_id: int, seqs: tuple[int, ...], witnessed: tuple[int, ...] | None) -> StepPlan:
    scheduled = tuple(ScheduledSequence(s, 0, 2, (), True) for s in seqs)
    return StepPlan(step_id, scheduled, (1,) * (2 * len(seqs)), witness_seq_ids=witnessed)


def test_the_witness_keeps_only_the_declared_sequences() -> None:
    hidden = torch.arange(3 * 2 * 2, dtype=torch.float32).reshape(6, 2)
    witness = InputWitness()
    witness.record("h", _plan(1, (4, 5, 6), ()), hidden)
    assert len(witness) == 0 and "no input of step 1" in witness.rows("h", 1, 0, [4])
    witness.record("h", _plan(2, (4, 5, 6), (5,)), hidden)
    assert witness.rows("h", 2, 0, [5]).tolist() == [[6.0, 7.0]]
    assert "had no rows of [4]" in witness.rows("h", 2, 0, [4])
    witness.record("h", _plan(3, (4, 5, 6), None), hidden)  # an older head: every row
    assert witness.rows("h", 3, 0, [6, 4]).tolist() == [[10.0, 11.0], [2.0, 3.0]]
    assert len(witness) == 2


@pytest.mark.parametrize("witnessed", [None, (), (3, 9)])
def test_the_declaration_travels_with_the_plan(witnessed: tuple[int, ...] | None) -> None:
    plan = _plan(7, (3, 9), witnessed)
    message = plan_to_proto(plan)
    assert message.HasField("witness") == (witnessed is not None)
    assert plan_from_proto(pb.StepPlan.FromString(message.SerializeToString())) == plan
    old = pb.StepPlan.FromString(message.SerializeToString())
    old.ClearField("witness")  # what an older head sends
    assert plan_from_proto(old).witness_seq_ids is None


def _node(node_id: str, start: int, end: int) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), f"{node_id}:1", 10, 16)


def test_the_head_declares_only_the_checked_sequences() -> None:
    """F = 0.5; of two new sequences the first is chosen, the second not. The step sent
    declares the first; each check route's plan declares its shadow; the route's last hop
    is never the one checked here, so the node after it has something to tell."""
    route = Route(
        tuple(RouteHop(n, f"{n}:1", s, e) for n, s, e in (("h", 0, 1), ("a", 1, 2), ("c", 2, 3))),
        "h:1",
    )
    nodes = [_node("a", 1, 2), _node("b", 1, 2), _node("b2", 1, 2), _node("c", 2, 3)]
    spot = HeadSpotChecks(0.5, ("float32",), "h", TransportConfig(), rng=random.Random(0))
    spot.checker.should_check = iter([True, False]).__next__  # the draws F = 0.5 may give
    try:
        plan = StepPlan(
            0,
            (ScheduledSequence(1, 0, 2, (), True), ScheduledSequence(2, 0, 2, (), True)),
            (5, 6, 5, 6),
            (NewSequenceData(1, (5, 6), 2, GREEDY), NewSequenceData(2, (5, 6), 2, GREEDY)),
        )
        mirror = spot.plan(plan, route, nodes)
        assert mirror is not None and mirror.declare(plan).witness_seq_ids == (1,)
        assert len(mirror.parts) == 2
        for part in mirror.parts:
            (shadow,) = part.plan.witness_seq_ids
            assert shadow >= SHADOW_OFFSET and [s.seq_id for s in part.plan.scheduled] == [shadow]
        later = StepPlan(1, (ScheduledSequence(2, 2, 1, (), True),), (7,))
        assert spot.plan(later, route, nodes) is None  # only an unchecked sequence: nothing
    finally:
        spot.close()


def _info(config: TransportConfig, start: int, end: int) -> NodeInfo:
    return NodeInfo(
        config.security.node_id if config.security else f"n{start}",
        MODEL,
        LayerRange(start, end),
        "127.0.0.1:0",
        wire_dtype="float32",
    )


def test_stages_keep_no_rows_when_no_step_is_checked() -> None:
    """The default (no spot checks): three stages after the head, two sequences, six
    steps; every stage received every step and kept nothing for witnesses."""
    config = TransportConfig(step_timeout_s=10.0, rpc_timeout_s=3.0)
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 1), MODEL),
        NodeInfo("head", MODEL, LayerRange(0, 1), "127.0.0.1:0", wire_dtype="float32"),
        config,
    ).start()
    nodes: list[StageNode] = []
    try:
        for index, (start, end) in enumerate(((1, 2), (2, 3))):
            info = NodeInfo(
                f"stage{index}", MODEL, LayerRange(start, end), "127.0.0.1:0", wire_dtype="float32"
            )
            executor = ToyStageExecutor(LayerRange(start, end), MODEL)
            nodes.append(StageNode(executor, info, config, initial_peer=head.address).start())
        assert wait_until(lambda: len(head.pipeline().stages) == 3 and head.readiness() is None)
        seqs, prompt = (1, 2), (5, 6, 7)
        plan = StepPlan(
            0,
            tuple(ScheduledSequence(s, 0, len(prompt), (), True) for s in seqs),
            prompt * len(seqs),
            tuple(NewSequenceData(s, prompt, len(prompt), GREEDY) for s in seqs),
        )
        for step in range(6):
            head.submit(plan)
            result = first_result(head)
            assert result.error is None, result.error
            tokens = {t.seq_id: t.token_id for t in result.sampled}
            plan = StepPlan(
                step + 1,
                tuple(ScheduledSequence(s, len(prompt) + step, 1, (), True) for s in seqs),
                tuple(tokens[s] for s in seqs),
            )
        assert all(node.bytes_received > 0 for node in nodes)
        assert [len(node.witness_store) for node in nodes] == [0, 0]
    finally:
        for node in nodes:
            node.stop()
        head.close()
