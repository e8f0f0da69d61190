"""A node loss replays each of its sequences once: the failed step's result and the
failure report both name the sequence, and whichever the engine takes second must not
move it again, even when the sequence was already sent on another route in between."""

from __future__ import annotations

import time

from molink.config import LayerRange
from molink.engine.recovery import NodeFailure
from molink.pipeline import NodeInfo
from molink.pipeline.failover import FailoverDesk
from molink.pipeline.toy import toy_identity
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepResult
from molink.transport.config import TransportConfig
from tests.helpers.toy_swarm import toy_swarm
from tests.unit.test_engine_state_ownership import _engine


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _copies_sent(executor, seq_id: int) -> int:
    return sum(1 for p in executor.submitted for n in p.new_sequences if n.seq_id == seq_id)


def test_a_failure_reported_after_the_replay_was_sent_does_not_replay_again() -> None:
    """The head fails the lost node's steps first and reports the failure after: the
    engine replays the sequence from the failed step, sends it on another route, and only
    then takes the report (computed when the node was lost, so it still names the
    sequence). The copy on the new route is sound and must be kept."""
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=6))
    engine.step()
    executor.deliver_all()
    engine.step()  # the first token
    engine.step()  # the decode plan is out
    (out_step,) = executor.held
    executor.lose(out_step)
    failure = executor.failures.pop()  # noticed now, reported a little later
    for _ in range(3):  # the failed step replays it; its release, then its new copy go out
        engine.step()
    assert _copies_sent(executor, 0) == 2 and len(executor.held) == 1
    executor.failures.append(failure)
    streamed: list[int] = []
    for _ in range(30):
        executor.deliver_all()
        for output in engine.step():
            streamed += output.outputs[0].delta_token_ids
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    assert executor.stats.replayed_sequences == 1
    assert _copies_sent(executor, 0) == 2  # the first, and one replay
    assert len(streamed) == 5  # the 5 tokens after the first, each once


def test_the_loss_report_names_the_first_step_not_yet_submitted() -> None:
    desk = FailoverDesk("h", TransportConfig(), submit=lambda job: None)
    desk.note_submitted(4)
    node = NodeInfo("x", toy_identity(2), LayerRange(1, 2), "127.0.0.1:0")
    failure = desk.node_lost(node, FailureKind.UNREACHABLE, "gone", {})
    assert failure.before_step == 5 and desk.take() == [failure]


def test_a_sequence_refused_for_room_after_its_node_was_lost_keeps_no_failure_record() -> None:
    """The node is reported lost while the plan is out, and the plan comes back refused
    for room: the sequence restarts as a preemption, not a replay, so the failure's time
    must not stay with it (a later replay of it would be timed from this failure)."""
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=6))
    engine.step()
    executor.deliver_all()
    engine.step()  # the first token
    engine.step()  # the decode plan is out
    (out_step,) = executor.held
    executor.failures.append(
        NodeFailure("x", FailureKind.UNREACHABLE, "gone", (0,), time.monotonic(), out_step + 1)
    )
    engine.step()
    assert 0 in engine._failed_at
    executor.held.pop(out_step)
    executor.ready.append(StepResult(out_step, error="no room", failure_kind=FailureKind.KV_FULL))
    engine.step()
    assert engine.scheduler.num_preemptions == 1 and engine.has_unfinished_requests()
    assert engine._failed_at == {}


def test_a_copy_sent_while_the_routes_are_forgotten_is_not_reported_lost(monkeypatch) -> None:
    """The engine may send a replayed sequence again after the node left the registry and
    before the head forgot its routes: that step saw the node gone (it avoids it, or fails
    at once), so the loss report must not name it as lost."""
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head = swarm.head
        desk = head._failover
        desk.note_submitted(40)
        evict = head.routes.evict

        def evict_after_a_step(node_id: str):
            desk.note_submitted(41)  # sent meanwhile
            return evict(node_id)

        monkeypatch.setattr(head.routes, "evict", evict_after_a_step)
        assert head.evict_node("a", "taken out by the test")
        (failure,) = head.take_failures()
        assert failure.before_step == 41
