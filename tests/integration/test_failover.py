"""Failover by replay: a node killed or frozen mid-stream, and the streams go on unchanged.

* A head and two replicas of the tail span: many streamed greedy and seeded sampled
  requests; the replica holding the most sequences is killed (SIGKILL) or frozen
  (SIGSTOP) once every request has tokens. No request fails, every output equals the same
  requests on one process, /metrics counts the failover and the replays, and afterwards no
  live node holds a sequence. The frozen one is then resumed (SIGCONT): it rejoins as a
  fresh node, keeps nothing of the moved sequences, and serves new requests, whose outputs
  are still those of one process.
* A chain of three spans plus a replica of the middle one: the middle node in use is
  killed; the same checks (the tail, after the lost node, is freed by a direct release).
* The head is killed mid-stream and started again with its command: within the lease
  time the stage has freed every block of the old head, joins the new one by itself, and
  the new head serves requests equal to one process; no stage is restarted. The stage's
  own /health says 200 throughout (it is healthy), and a request sent to it gets a 503
  that points to the head.
* No replica: the only tail node is killed mid-stream; the requests end with an error
  within the failover timeout (an error event in the started streams), new requests get
  a 503 naming the missing layers, and the tail restarted with its command serves again
  without restarting the head.

The kill waits for a condition (every stream has tokens, the victim holds sequences), not
for a time, so the test does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import time

import httpx
import pytest

from molink.engine.offline import LLM
from molink.transport.channel import NodeClient
from tests.helpers.server_process import start_process
from tests.integration.conftest import is_idle
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    Case,
    Node,
    Pipeline,
    assert_same_completions,
    call_node,
    complete_all,
    head_health,
    head_metrics,
    node_command,
    reference_completions,
    running_pipeline,
    stage_health,
    stop_node,
    wait_answering,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration

NUM_GREEDY = 16
NUM_SEEDED = 4
MAX_TOKENS = 128
CONTEXT = 512
TOKENS_BEFORE_KILL = 4  # every request has streamed this many before the victim goes
KILL_WAIT_S = 240.0
RECOVERY_S = 120.0
# A frozen node misses its step deadline (2 s floor) and a probe (2 s), or two health
# checks: it is out within seconds; the bound leaves room for a loaded machine.
FAILOVER_TIMEOUT_S = 8.0
LEASE_S = 6.0


def _cases(token_ids: list[int]) -> list[Case]:
    cases = []
    for index in range(NUM_GREEDY + NUM_SEEDED):
        prompt = (token_ids * 2)[index : index + 5 + index % 7]
        seed = 500 + index if index >= NUM_GREEDY else None
        cases.append(Case(prompt, MAX_TOKENS, stream=True, seed=seed, ignore_eos=True))
    return cases


@pytest.fixture(scope="module")
def model_and_reference(tiny_model_dir):
    model = str(tiny_model_dir("llama", max_position_embeddings=CONTEXT))
    llm = LLM(model=model)
    cases = _cases(llm.tokenizer.encode(PASSAGE))
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    return model, cases, expected


def _sampled(pipeline: Pipeline) -> float:
    return head_metrics(pipeline.base_url).get("molink:pipeline_sampled_tokens_total", 0.0)


async def _run_and_stop(
    pipeline: Pipeline, replicas: list[Node], cases: list[Case], sig: signal.Signals
) -> tuple[list, Node]:
    """Runs every case; once each has tokens, sends ``sig`` to the replica holding the
    most sequences. Returns the completions and the victim."""
    task = asyncio.ensure_future(complete_all(pipeline.base_url, cases))
    need = len(cases) * TOKENS_BEFORE_KILL
    deadline = time.monotonic() + KILL_WAIT_S
    while _sampled(pipeline) < need:
        assert not task.done(), "the requests ended before the kill"
        assert time.monotonic() < deadline, "the requests did not get going"
        await asyncio.sleep(0.05)
    held = {node.grpc_address: stage_health(node).active_sequences for node in replicas}
    victim = max(replicas, key=lambda node: held[node.grpc_address])
    assert held[victim.grpc_address] > 0, held
    victim.process.send_signal(sig)
    return await task, victim


def _assert_failover_counted(pipeline: Pipeline) -> None:
    values = head_metrics(pipeline.base_url)
    assert values["molink:failovers_total"] >= 1, values
    assert values["molink:replayed_sequences_total"] >= 1, values
    assert values["molink:replayed_tokens_total"] >= values["molink:replayed_sequences_total"]
    assert values["molink:failover_recovery_seconds_count"] >= 1, values


def _wait_all_free(pipeline: Pipeline, victim: Node | None = None) -> None:
    """The head idle and no live node (but the victim) holding a sequence."""

    def live() -> dict[str, int]:
        return {
            node.grpc_address: stage_health(node).active_sequences
            for node in pipeline.all_nodes()
            if node.process.poll() is None and node is not victim
        }

    wait_until(lambda: is_idle(head_metrics(pipeline.base_url)), RECOVERY_S, "the head is idle")
    wait_until(lambda: not any(live().values()), RECOVERY_S, lambda: f"nodes hold {live()}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_a_lost_replica_is_replayed_with_the_same_outputs(model_and_reference, sig) -> None:
    model, cases, expected = model_and_reference
    args = ("--molink-failover-timeout", "60", "--molink-lease-timeout", str(LEASE_S))
    with running_pipeline((0, 2, 4), model, extra_args=args) as pipeline:
        replica = pipeline.start_stage(2, -1, extra_args=args)
        wait_answering(replica)
        replicas = [pipeline.nodes[1], replica]
        try:
            got, victim = await _run_and_stop(pipeline, replicas, cases, sig)
            assert_same_completions(got, expected, cases)
            _assert_failover_counted(pipeline)
            assert "failover: node" in pipeline.head.log_text()
            _wait_all_free(pipeline, victim)
            if sig is signal.SIGSTOP:
                survivor = next(node for node in replicas if node is not victim)
                await _resumed_node_rejoins_fresh(pipeline, victim, survivor, cases, expected)
        finally:
            for node in replicas:
                if node.process.poll() is None:
                    node.process.send_signal(signal.SIGCONT)


async def test_a_lost_middle_node_is_replayed_through_its_replica(model_and_reference) -> None:
    model, cases, expected = model_and_reference
    with running_pipeline((0, 1, 3, 4), model) as pipeline:
        replica = pipeline.start_stage(1, 3)
        wait_answering(replica)
        middles = [pipeline.nodes[1], replica]
        got, victim = await _run_and_stop(pipeline, middles, cases, signal.SIGKILL)
        assert_same_completions(got, expected, cases)
        _assert_failover_counted(pipeline)
        _wait_all_free(pipeline, victim)


async def _resumed_node_rejoins_fresh(
    pipeline: Pipeline, victim: Node, survivor: Node, cases: list[Case], expected: list
) -> None:
    victim.process.send_signal(signal.SIGCONT)
    # Its lease on the head's sequences lapses (the head no longer checks it): it frees
    # them all and joins again.
    wait_until(
        lambda: "joined head" in victim.log_text().split("lapsed")[-1],
        RECOVERY_S,
        "the resumed node joined the head again",
    )
    wait_until(lambda: stage_health(victim).active_sequences == 0, RECOVERY_S, "it holds nothing")
    # With the other replica gone, new work can only go through the resumed node.
    stop_node(survivor)
    wait_until(lambda: len(_members(pipeline)) == 2, RECOVERY_S, "the head dropped the survivor")
    wait_ready(pipeline.base_url)
    before = stage_health(victim).steps_processed
    got = await complete_all(pipeline.base_url, cases)
    assert_same_completions(got, expected, cases)
    assert stage_health(victim).steps_processed > before  # it serves new work
    _wait_all_free(pipeline)


async def test_no_route_left_errors_then_a_restarted_tail_serves(model_and_reference) -> None:
    model, cases, expected = model_and_reference
    timeout = FAILOVER_TIMEOUT_S
    args = ("--molink-failover-timeout", str(timeout))
    with running_pipeline((0, 2, 4), model, extra_args=args) as pipeline:
        tail = pipeline.nodes[1]
        streams = cases[:6]
        task = asyncio.ensure_future(_stream_outcomes(pipeline.base_url, streams))
        wait = time.monotonic() + KILL_WAIT_S
        while _sampled(pipeline) < len(streams) * TOKENS_BEFORE_KILL:
            assert not task.done() and time.monotonic() < wait
            await asyncio.sleep(0.05)
        killed_at = time.monotonic()
        tail.kill()
        outcomes = await task
        for status, error, ended_at in outcomes:
            assert status == 200 and error is not None, outcomes  # an error event
            assert "layers [2, 4) are not served" in error, error
            assert ended_at - killed_at < timeout + 20, outcomes
        # The head stays up; new requests get a 503 naming the missing layers.
        response = httpx.post(
            f"{pipeline.base_url}/v1/completions",
            json={"model": _model_name(pipeline), "prompt": "hello", "max_tokens": 3},
            timeout=30,
        )
        assert response.status_code == 503, response.text
        assert "layers [2, 4)" in response.json()["error"]["message"]
        wait_until(lambda: is_idle(head_metrics(pipeline.base_url)), RECOVERY_S, "blocks free")
        # The tail restarted with its original command: served again, head untouched.
        restarted = pipeline.start_stage(2, -1, extra_args=args, grpc_port=tail.grpc_port)
        wait_answering(restarted)
        wait_ready(pipeline.base_url)
        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        assert head_health(pipeline.base_url)[0] == 200


async def test_a_restarted_head_is_served_and_the_old_ones_blocks_are_freed(
    model_and_reference,
) -> None:
    model, cases, expected = model_and_reference
    args = ("--molink-lease-timeout", str(LEASE_S))
    with running_pipeline((0, 2, 4), model, extra_args=args) as pipeline:
        head, tail = pipeline.nodes
        task = asyncio.ensure_future(_stream_outcomes(pipeline.base_url, cases[:6]))
        wait = time.monotonic() + KILL_WAIT_S
        while stage_health(tail).active_sequences == 0 or _sampled(pipeline) < 6:
            assert not task.done() and time.monotonic() < wait
            await asyncio.sleep(0.05)
        head.kill()
        killed_at = time.monotonic()
        await asyncio.gather(task, return_exceptions=True)
        assert httpx.get(f"{tail.base_url}/health", timeout=10).status_code == 200
        wait_until(lambda: _holds_nothing(tail), LEASE_S + 30, lambda: f"{stage_health(tail)}")
        assert time.monotonic() - killed_at < LEASE_S + 30
        # The same command again (same ports): the stage joins it when it comes up.
        command = node_command(head.server.port, head.grpc_port, 0, 2, model, None, args)
        pipeline.nodes[0] = Node(start_process(command, head.server.port), head.grpc_port, 0, 2)
        wait_answering(pipeline.nodes[0])
        wait_ready(pipeline.base_url, RECOVERY_S)
        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        assert httpx.get(f"{tail.base_url}/health", timeout=10).status_code == 200
        response = httpx.post(
            f"{tail.base_url}/v1/completions",
            json={"model": _model_name(pipeline), "prompt": "hi", "max_tokens": 2},
            timeout=30,
        )
        assert response.status_code == 503 and "head" in response.json()["error"]["message"]
        _wait_all_free(pipeline)


def _holds_nothing(node: Node) -> bool:
    health = stage_health(node)
    return health.active_sequences == 0 and health.free_kv_blocks == health.total_kv_blocks


def _members(pipeline: Pipeline) -> list[str]:
    view = call_node(pipeline.head.grpc_address, NodeClient.get_pipeline)
    return [stage.node_id for stage in view.stages]


def _model_name(pipeline: Pipeline) -> str:
    return httpx.get(f"{pipeline.base_url}/v1/models", timeout=10).json()["data"][0]["id"]


async def _stream_outcomes(base_url: str, cases: list[Case]) -> list[tuple[int, str | None, float]]:
    import json

    async def one(http: httpx.AsyncClient, case: Case) -> tuple[int, str | None, float]:
        body = {
            "model": _model_name_from(http),
            "prompt": case.prompt,
            "max_tokens": case.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        error = None
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        error = event["error"]["message"]
        return response.status_code, error, time.monotonic()

    timeout = httpx.Timeout(10.0, read=RECOVERY_S)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout) as http:
        http.headers["x-model"] = (await http.get("/v1/models")).json()["data"][0]["id"]
        return await asyncio.gather(*(one(http, case) for case in cases))


def _model_name_from(http: httpx.AsyncClient) -> str:
    return http.headers["x-model"]
