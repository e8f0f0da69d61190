"""A sequence released along its old route (preempted, replayed, aborted) may be sent again
along another route that shares a later node with the old one (replicas a and b of
[1, 2), n of [2, 4) behind either). The release and the new copy then reach that node by
different streams, and the release may come second: it must leave the new copy alone (it
names the first step not yet submitted when it left, and a node keeps copies that plans
of that step or later started)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from molink.pipeline import PipelineExecutor
from molink.pipeline.toy import ToyStageExecutor, expected_token
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from tests.helpers.polling import first_result
from tests.helpers.toy_swarm import PROMPT, REPLICAS_BEFORE_N, decode, prefill, toy_swarm

Swarm = tuple[PipelineExecutor, dict[str, ToyStageExecutor]]


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    with toy_swarm(REPLICAS_BEFORE_N) as swarm:
        yield swarm.head, swarm.executors


def test_a_release_that_arrives_after_a_copy_sent_by_another_route_keeps_it(
    swarm: Swarm, monkeypatch
) -> None:
    head, executors = swarm
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    (old,) = [n for n, count in head.routes.load().items() if count and n in ("a", "b")]
    other = "b" if old == "a" else "a"
    gate, at_n = threading.Event(), threading.Event()
    slow, last = executors[old], executors["n"]
    slow_release, last_release = slow.release, last.release

    def held_release(seq_ids, head_id=""):
        gate.wait(30.0)  # the old route's replica is busy: the release waits there
        slow_release(seq_ids, head_id)

    def noted_release(seq_ids, head_id=""):
        last_release(seq_ids, head_id)
        at_n.set()

    monkeypatch.setattr(slow, "release", held_release)
    monkeypatch.setattr(last, "release", noted_release)
    head.release([7])  # e.g. preempted: freed along its old route
    head.routes.avoid(old, 60.0)  # sent again, it takes the other replica
    head.submit(prefill(1, 7))
    first = first_result(head)
    assert first.error is None
    route = head.routes.route_of(7)
    assert route is not None and route.contains(other)
    gate.set()  # the release goes on from the old replica to n, after the new copy
    assert at_n.wait(30.0)
    assert ("h", 7) in last.sequences
    token = first.sampled[0].token_id
    head.submit(decode(2, 7, token))
    second = first_result(head)
    assert second.error is None, second.error
    assert second.sampled[0].token_id == expected_token(token, 7, 4)


@pytest.fixture
def two_spans() -> Iterator[Swarm]:
    """head [0, 1); replicas a and b of [1, 2); n of [2, 3); replicas x and y of [3, 4)."""
    spans = (("a", 1, 2), ("b", 1, 2), ("n", 2, 3), ("x", 3, 4), ("y", 3, 4))
    with toy_swarm(spans) as swarm:
        yield swarm.head, swarm.executors


def test_a_failover_release_that_arrives_after_the_replay_keeps_the_new_copy(
    two_spans: Swarm, monkeypatch
) -> None:
    head, executors = two_spans
    head.submit(prefill(0, 7))
    first = first_result(head)
    assert first.error is None
    route = head.routes.route_of(7)
    assert route is not None
    old = "a" if route.contains("a") else "b"
    lost = "x" if route.contains("x") else "y"
    gate, at_n = threading.Event(), threading.Event()
    slow, middle = executors[old], executors["n"]
    slow_release, middle_release = slow.release, middle.release

    def held_release(seq_ids, head_id=""):
        gate.wait(30.0)  # the old route's replica is busy: the release waits there
        slow_release(seq_ids, head_id)

    def noted_release(seq_ids, head_id=""):
        middle_release(seq_ids, head_id)
        at_n.set()

    monkeypatch.setattr(slow, "release", held_release)
    monkeypatch.setattr(middle, "release", noted_release)
    assert head.evict_node(lost, "taken out by the test")  # n, before it, is freed in band
    head.routes.avoid(old, 60.0)  # the replay takes the other replica of [1, 2)
    head.submit(prefill(1, 7))
    replayed = first_result(head)
    assert replayed.error is None, replayed.error
    gate.set()  # the release goes on from the old replica to n, after the replay's copy
    assert at_n.wait(30.0)
    assert ("h", 7) in middle.sequences
    token = replayed.sampled[0].token_id
    head.submit(decode(2, 7, token))
    second = first_result(head)
    assert second.error is None, second.error
    assert second.sampled[0].token_id == expected_token(token, 7, 4)


def test_a_step_that_frees_a_sequence_after_its_new_copy_came_by_another_route_keeps_it(
    swarm: Swarm, monkeypatch
) -> None:
    """The release a plan carries (``finished_seq_ids``) may also come second: a plan on
    the old route, held up at its busy replica, frees a sequence that a later plan has
    already sent again through the other replica to their shared node."""
    head, executors = swarm
    both = StepPlan(
        0,
        tuple(ScheduledSequence(s, 0, len(PROMPT), (), True) for s in (7, 8)),
        PROMPT + PROMPT,
        tuple(
            NewSequenceData(s, PROMPT, len(PROMPT), SamplingParams(temperature=0.0)) for s in (7, 8)
        ),
    )
    head.submit(both)
    tokens = {t.seq_id: t.token_id for t in first_result(head).sampled}
    (old,) = [n for n, count in head.routes.load().items() if count and n in ("a", "b")]
    gate = threading.Event()
    slow, last = executors[old], executors["n"]
    slow_execute = slow.execute

    def held_execute(plan, hidden, head_id=""):
        if plan.step_id == 1:
            gate.wait(30.0)  # the old route's replica is busy with this step
        return slow_execute(plan, hidden, head_id)

    monkeypatch.setattr(slow, "execute", held_execute)
    # Sequence 7 was preempted: the next plan on its route (8's decode) frees it there...
    decode_8 = StepPlan(
        1, (ScheduledSequence(8, len(PROMPT), 1, (), True),), (tokens[8],), finished_seq_ids=(7,)
    )
    head.submit(decode_8)
    # ... and it is sent again through the other replica, which gets to n first.
    head.routes.avoid(old, 60.0)
    head.submit(prefill(2, 7))
    again = first_result(head)
    assert again.step_id == 2 and again.error is None, again.error
    gate.set()
    late = first_result(head)
    assert late.step_id == 1 and late.error is None, late.error
    assert ("h", 7) in last.sequences
    token = again.sampled[0].token_id
    head.submit(decode(3, 7, token))
    second = first_result(head)
    assert second.error is None, second.error
    assert second.sampled[0].token_id == expected_token(token, 7, 4)
