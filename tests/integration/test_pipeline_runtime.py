"""The pipeline runtime across real processes on 127.0.0.1.

The head runs in this process; stages are ``python -m molink.pipeline.toy`` children.
Every wait is bounded and every child is killed in ``finally``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import torch

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.pipeline.wire import route_to_proto
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.codec import encode_tensor
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from tests.helpers.server_process import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NUM_LAYERS = 6
START_TIMEOUT_S = 120.0  # children import torch; slow on a loaded machine
CONFIG = TransportConfig(step_timeout_s=20.0, health_interval_s=0.5, health_timeout_s=2.0)


@dataclass
class Cluster:
    head: PipelineExecutor
    vocab_size: int
    log_dir: Path
    stages: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def spawn(self, node_id: str, layers: str, wire: str, delay: float = 0.0) -> None:
        address = f"127.0.0.1:{free_port()}"
        log = open(self.log_dir / f"{node_id}.log", "w")  # noqa: SIM115 - closed with the child
        cmd = [
            sys.executable, "-m", "molink.pipeline.toy", "--node-id", node_id,
            "--layers", layers, "--num-layers", str(NUM_LAYERS),
            "--vocab-size", str(self.vocab_size), "--listen", address,
            "--initial-peer", self.head.address, "--wire-dtype", wire, "--delay", str(delay),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.stages[node_id] = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        self.addresses[node_id] = address

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while self.head.readiness() is not None:
            for node_id, proc in self.stages.items():
                if proc.poll() is not None and proc.returncode != -9:
                    log = (self.log_dir / f"{node_id}.log").read_text()
                    raise AssertionError(f"stage {node_id} exited:\n{log}")
            assert time.monotonic() < deadline, self.head.readiness()
            time.sleep(0.2)

    def kill(self, node_id: str) -> None:
        proc = self.stages[node_id]
        proc.kill()
        proc.wait(10)

    def close(self) -> None:
        for proc in self.stages.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.stages.values():
            proc.wait(10)
        self.head.close()


def _cluster(tmp_path: Path, head_layers: int, wire: str, vocab_size: int) -> Cluster:
    model = toy_identity(NUM_LAYERS, vocab_size=vocab_size)
    layers = LayerRange(0, head_layers)
    info = NodeInfo("head", model, layers, "127.0.0.1:0", wire_dtype=wire)
    head = PipelineExecutor(ToyStageExecutor(layers, model), info, CONFIG).start()
    return Cluster(head=head, vocab_size=vocab_size, log_dir=tmp_path)


def _prefill(step_id: int, seq_id: int, tokens: tuple[int, ...], mb: int) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, len(tokens), (mb,), True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, len(tokens), SamplingParams()),),
        micro_batch=mb,
    )


def _decode(step_id: int, seq_id: int, token: int, done: int, mb: int) -> StepPlan:
    return StepPlan(
        step_id, (ScheduledSequence(seq_id, done, 1, (), True),), (token,), micro_batch=mb
    )


def _poll_until(head: PipelineExecutor, count: int, timeout: float) -> list[StepResult]:
    results: list[StepResult] = []
    deadline = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < deadline:
        results += head.poll(0.1)
    return results


def _generate(cluster: Cluster, num_micro_batches: int, steps: int, first_seq: int) -> None:
    """Drive several micro-batches like the engine: each result feeds the next step."""
    head, vocab = cluster.head, cluster.vocab_size
    step_ids = iter(range(1000 * first_seq, 1000 * first_seq + 1000))
    last_token = {mb: 3 + 7 * mb for mb in range(num_micro_batches)}
    done = {mb: 0 for mb in range(num_micro_batches)}
    seen_steps: dict[int, list[int]] = {mb: [] for mb in range(num_micro_batches)}
    for mb in range(num_micro_batches):
        prompt = (1, 2, last_token[mb])
        head.submit(_prefill(next(step_ids), first_seq + mb, prompt, mb))
        done[mb] = len(prompt)
    deadline = time.monotonic() + 60
    while any(len(s) < steps for s in seen_steps.values()):
        assert time.monotonic() < deadline, seen_steps
        for result in head.poll(0.1):
            mb, seq_id = result.micro_batch, first_seq + result.micro_batch
            assert result.error is None, result.error
            token = result.sampled[0].token_id
            assert token == expected_token(last_token[mb], seq_id, NUM_LAYERS, vocab)
            seen_steps[mb].append(result.step_id)
            last_token[mb] = token
            if len(seen_steps[mb]) < steps:
                head.submit(_decode(next(step_ids), seq_id, token, done[mb], mb))
                done[mb] += 1
    for ids in seen_steps.values():
        assert ids == sorted(ids)  # in order within a micro-batch


def test_two_processes_with_int8_activations(tmp_path: Path) -> None:
    cluster = _cluster(tmp_path, head_layers=3, wire="int8", vocab_size=1000)
    try:
        cluster.spawn("s1", "3:-1", wire="int8")
        cluster.wait_ready()
        _generate(cluster, num_micro_batches=4, steps=6, first_seq=1)
        metrics = cluster.head.metrics()
        assert set(metrics.hops) == {"head->s1", "s1->head"}
        assert metrics.sampled_tokens == 24 and metrics.bytes_per_token > 0
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    # bfloat16 holds integers up to 256 exactly, hence the small toy vocabulary.
    cluster = _cluster(
        tmp_path_factory.mktemp("three"), head_layers=2, wire="float16", vocab_size=250
    )
    try:
        cluster.spawn("s1", "2:4", wire="bfloat16", delay=0.05)
        cluster.spawn("s2", "4:6", wire="float16", delay=0.01)
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.close()


def test_three_processes_with_micro_batches_in_flight(three: Cluster) -> None:
    _generate(three, num_micro_batches=4, steps=8, first_seq=10)
    assert set(three.head.metrics().hops) == {"head->s1", "s1->s2", "s2->head"}
    table = pipeline_status(three.addresses["s2"], CONFIG)
    assert "ready: every layer is served" in table and "float32/bfloat16" in table


def test_malformed_forward_is_rejected_and_the_stage_keeps_serving(three: Cluster) -> None:
    head = three.head
    plan = _prefill(1, 900, (1, 2), mb=0)
    request = pb.ForwardRequest(head_id="head", sender_id="rogue")
    route = head.routes.route_for_new(2)
    assert route is not None
    request.route.CopyFrom(route_to_proto(route))
    request.step.plan.CopyFrom(plan_to_proto(plan, include_token_ids=False))
    request.step.hidden.CopyFrom(encode_tensor(torch.zeros(3, 8), "float16"))  # 3 rows, not 2
    with grpc.insecure_channel(three.addresses["s1"]) as channel:
        acks = list(pb_grpc.MolinkNodeStub(channel).Forward(iter([request]), timeout=10))
    assert "shape [3, 8], expected [2, 8]" in acks[0].error
    # A plan naming a sequence the stage never saw comes back to the head as an error.
    head.submit(_decode(2, 901, 5, 3, mb=0))
    [result] = _poll_until(head, 1, timeout=20)
    assert "stage s1 rejected step 2" in result.error and "never received: 901" in result.error
    _generate(three, num_micro_batches=2, steps=3, first_seq=20)


def test_killing_a_stage_fails_steps_in_flight_and_the_head_recovers(three: Cluster) -> None:
    """Runs last on the module's cluster: it kills s1 and starts a replacement."""
    head = three.head
    for mb in range(8):
        head.submit(_prefill(100 + mb, 30 + mb, (1, 2, 3), mb))
    results = _poll_until(head, 1, timeout=20)  # the pipeline is flowing; s1 holds a queue
    three.kill("s1")
    killed_at = time.monotonic()
    results += _poll_until(head, 8 - len(results), timeout=15)
    assert len(results) == 8, results
    assert time.monotonic() - killed_at < 10
    errors = [r.error for r in results if r.error]
    assert errors and all("stage s1" in e for e in errors), errors
    deadline = time.monotonic() + 15
    while "stopped answering" not in (head.readiness() or ""):
        assert time.monotonic() < deadline, head.readiness()
        time.sleep(0.1)
    assert head.readiness().startswith("layers [2, 4) are not served by any node; stage s1")
    head.submit(_prefill(200, 40, (1,), 0))  # refused at once while layers are missing
    [refused] = _poll_until(head, 1, timeout=5)
    assert "not ready: layers [2, 4)" in refused.error
    three.spawn("s1b", "2:4", wire="bfloat16")
    three.wait_ready()
    _generate(three, num_micro_batches=2, steps=3, first_seq=50)
