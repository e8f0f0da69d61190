"""Spot checks in a running pipeline (head and stages as threads of this process, members
of one swarm, toy executors, float32 on the wire): with F = 1 every sequence also runs on
the two other replicas of its span; a replica that perturbs its hidden states (enough to
change a token, or so little that no token changes), or one that returns wrong tokens,
whether it is the sequences' primary or a check, is banned after its first checked step,
evicted (its sequences are replayed), refused when it comes back, and shown in the metrics
and the status. Users' steps are not held for the checks; the tokens of checked sequences
are marked held, for the engine to keep from their users until the verdict (what users get:
test_spot_check_user_outputs.py). Driving the head directly, this test sees a lying
primary's token before its ban, and everything after it is what one process gives. Honest
replicas whose answers differ by float rounding are never banned."""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Iterator

import pytest
import torch

from molink.cli.args import add_engine_args
from molink.cli.main import parse_engine_args
from molink.config import LayerRange
from molink.dashboard.pipeline_provider import PipelineSwarmProvider
from molink.engine.protocol import EngineStats
from molink.pipeline import PipelineExecutor, StageNode
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import expected_token
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from tests.helpers.polling import first_result, wait_until
from tests.helpers.spot_swarm import (
    MODEL,
    PERTURBATIONS,
    Swarm,
    SwitchableExecutor,
    lying_swarm,
    member,
    node_info,
    start_head,
    wait_for_five_nodes,
)

GREEDY = SamplingParams(temperature=0.0)
# The lies that change what a user would get from a lying primary.
CHANGES_TOKENS = ("perturbed-hidden-states", "wrong-tokens")


@pytest.fixture(
    params=[
        ("perturbed-hidden-states", "primary"),
        ("perturbed-hidden-states", "check"),
        ("slightly-perturbed-hidden-states", "primary"),
        ("slightly-perturbed-hidden-states", "check"),
        ("wrong-tokens", "primary"),
        ("wrong-tokens", "check"),
    ],
    ids=lambda p: "-".join(p),
)
def swarm(request) -> Iterator[Swarm]:
    """Three replicas of the lying span ([1, 2) for perturbed hidden states, [2, 4) for
    wrong tokens); the liar is the primary or answers checks only."""
    lie, role = request.param
    lying_span = (1, 2) if lie in PERTURBATIONS else (2, 4)
    with lying_swarm(lie, lying_span, role) as built:
        yield built


def _prefill(step: int, seq_id: int, history: tuple[int, ...], prompt_len: int) -> StepPlan:
    """A sequence's first step, or its replay with every token it has (as the engine does)."""
    return StepPlan(
        step,
        (ScheduledSequence(seq_id, 0, len(history), (seq_id,), True),),
        history,
        (NewSequenceData(seq_id, history, prompt_len, GREEDY),),
    )


def _one_process(first: int, seq_id: int, count: int = 3) -> list[int]:
    """``count`` tokens of ``seq_id`` as one process gives them, from its first token."""
    tokens = [first]
    while len(tokens) < count:
        tokens.append(expected_token(tokens[-1], seq_id, 4, 1024))
    return tokens


def test_a_liar_is_banned_and_users_get_what_one_process_gives(swarm: Swarm) -> None:
    """Like the engine: each sequence generates 3 tokens; a sequence whose route lost a
    node is replayed from all its tokens (the head's take_failures). After the first
    sequence's first (checked) step the test waits for the verdict, judged apart."""
    head, liar = swarm.head, swarm.liar
    dashboard = PipelineSwarmProvider(head, lambda: EngineStats(0, 0, 1, 1))
    dashboard.snapshot()  # it sees every node, as the server's sampler does each second
    prompt = (5, 6, 7)
    step = 0
    outputs: dict[int, list[int]] = {}
    for seq_id in range(1, 4):
        history = prompt
        outputs[seq_id] = []
        plan = _prefill(step, seq_id, history, len(prompt))
        for _ in range(8):  # 3 tokens, and room for one replay
            head.submit(plan)
            result = first_result(head)
            step += 1
            if result.error is not None:  # its route lost a node (the liar, once banned)
                head.take_failures()
                plan = _prefill(step, seq_id, history, len(prompt))
                continue
            token = result.sampled[0].token_id
            if seq_id == 1 and not outputs[1]:  # checked: its token waits for the verdict
                assert result.held_seq_ids == (1,)
            outputs[seq_id].append(token)
            history += (token,)
            if len(outputs[seq_id]) == 3:
                break
            if seq_id == 1 and len(outputs[1]) == 1:  # the verdict, judged apart
                wait_until(lambda: head.pipeline().stage(liar.node_id) is None, 30.0)
            plan = StepPlan(
                step, (ScheduledSequence(seq_id, len(history) - 1, 1, (), True),), (token,)
            )
        head.release([seq_id])
    for seq_id, tokens in outputs.items():  # what one process gives from its first token
        assert tokens == _one_process(tokens[0], seq_id), seq_id
        if seq_id > 1 or swarm.role == "check" or swarm.lie not in CHANGES_TOKENS:
            assert tokens[0] == expected_token(prompt[-1], seq_id, 4, 1024), seq_id
        # else: the liar's token for seq 1's checked step, which the head marked held (the
        # engine drops it once the liar is convicted)
    assert wait_until(lambda: head.pipeline().stage(liar.node_id) is None, 30.0)
    reason = head._spot.bans.reason(liar.node_id)
    assert reason is not None and "disagreed with replicas" in reason
    assert [b.node_id for b in head._spot.bans.snapshot()] == [liar.node_id]
    assert head.pipeline().stage(liar.node_id) is None
    assert "is banned" in head.admit_discovered(liar.info)  # its record is ignored from now on
    status = pipeline_status(head.address, member())
    assert f"banned by spot checks: node {liar.node_id}: spot check: disagreed" in status
    metrics = "\n".join(head.metric_lines())
    assert f'molink_node_banned{{node="{liar.node_id}"' in metrics
    assert "molink_banned_nodes 1" in metrics
    shown = {node.node_id: node for node in dashboard.snapshot().nodes}[liar.node_id]
    assert shown.health == "banned" and shown.detail == f"banned: {reason}"
    if swarm.lie in PERTURBATIONS:  # the node after the span told what each replica sent
        assert "hidden states differ" in reason
        assert 'molink_spot_check_hidden_total{outcome="compared"} 0' not in metrics


def _counts_settle(head: PipelineExecutor, pairs: int, timeout: float = 60.0) -> bool:
    return wait_until(lambda: sum(head._spot.bans.counts()) >= pairs, timeout)


def test_honest_replicas_differing_by_rounding_are_never_banned() -> None:
    """Three honest replicas of [1, 2), each rounding differently (a few float32 units in
    the last place), serve four greedy sequences in one batch for 16 steps at F = 1:
    every step's hidden rows and tokens are compared (three pairs), and all agree."""
    head = start_head(member())
    nodes: list[StageNode] = []
    try:
        for start, end in ((1, 2), (1, 2), (1, 2), (2, 4)):
            config = member()
            executor = SwitchableExecutor(LayerRange(start, end), MODEL)
            executor.noise = 4 * torch.finfo(torch.float32).eps
            info = node_info(config, start, end)
            nodes.append(StageNode(executor, info, config, initial_peer=head.address).start())
        wait_for_five_nodes(head)
        seqs, prompt = (1, 2, 3, 4), (5, 6, 7)
        plan = StepPlan(
            0,
            tuple(ScheduledSequence(s, 0, len(prompt), (), True) for s in seqs),
            prompt * len(seqs),
            tuple(NewSequenceData(s, prompt, len(prompt), GREEDY) for s in seqs),
        )
        steps = 16
        for step in range(steps):
            head.submit(plan)
            result = first_result(head)
            assert result.error is None, result.error
            tokens = {t.seq_id: t.token_id for t in result.sampled}
            plan = StepPlan(
                step + 1,
                tuple(ScheduledSequence(s, len(prompt) + step, 1, (), True) for s in seqs),
                tuple(tokens[s] for s in seqs),
            )
        assert _counts_settle(head, 3 * steps)
        assert head._spot.bans.counts() == (3 * steps, 0)
        assert head.banned_nodes() == {}
        metrics = "\n".join(head.metric_lines())
        assert f'molink_spot_check_hidden_total{{outcome="compared"}} {steps}' in metrics
    finally:
        for node in nodes:
            node.stop()
        head.close()


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan"])
def test_the_verify_fraction_flag_names_its_range(value: str, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    command = f"--model m --molink-enabled --molink-verify-fraction {value}"
    with pytest.raises(SystemExit):
        parse_engine_args(parser, parser.parse_args(shlex.split(command)))
    assert f"--molink-verify-fraction: {value} must be in [0, 1]" in capsys.readouterr().err
