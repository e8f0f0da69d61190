"""The head's link estimates against links of known rate and delay.

head (this process) -> [emulated link A] -> s1 -> [emulated link B] -> s2 -> head, with
s1 and s2 toy stage processes that advertise the emulators' addresses, so that whoever
dials them goes through the emulated link. The head measures link A itself; s1 measures
link B and s2 the direct way back, and they report in their health answers.

The machine is shared and loaded, so the tolerance is wide (the unit tests of the
estimator hold it to 10% on synthetic samples). Every wait is bounded, every child is
killed and every emulator stopped in ``finally``.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from molink.config import LayerRange
from molink.engine.telemetry import LinkEstimate
from molink.netem import LinkEmulator, LinkSpec
from molink.pipeline import NodeInfo, PipelineExecutor
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.config import TransportConfig
from tests.helpers.server_process import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
NUM_LAYERS = 6
HIDDEN = 1024  # 2 KiB per token in float16: prefills of a few hundred tokens time the rate
VOCAB = 1000
LINK_A = LinkSpec.from_rtt(rate_mbit=50, rtt_ms=20)
LINK_B = LinkSpec.from_rtt(rate_mbit=20, rtt_ms=60)
TOLERANCE = 0.25
START_TIMEOUT_S = 120.0
CONFIG = TransportConfig(step_timeout_s=60.0, health_interval_s=0.5, health_timeout_s=3.0)


class Cluster:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.model = toy_identity(NUM_LAYERS, hidden_size=HIDDEN, vocab_size=VOCAB)
        info = NodeInfo("head", self.model, LayerRange(0, 2), f"{HOST}:0", wire_dtype="float16")
        executor = ToyStageExecutor(LayerRange(0, 2), self.model)
        self.head = PipelineExecutor(executor, info, CONFIG)
        self.stages: dict[str, subprocess.Popen] = {}
        self.emulators: list[LinkEmulator] = []

    def spawn_behind(self, node_id: str, layers: str, link: LinkSpec) -> None:
        """A toy stage that peers reach through an emulated ``link``."""
        port = free_port()
        emulator = LinkEmulator(HOST, 0, HOST, port, up=link).start()
        self.emulators.append(emulator)
        log = open(self.log_dir / f"{node_id}.log", "w")  # noqa: SIM115 - closed with the child
        cmd = [
            sys.executable, "-m", "molink.pipeline.toy", "--node-id", node_id,
            "--layers", layers, "--num-layers", str(NUM_LAYERS),
            "--hidden-size", str(HIDDEN), "--vocab-size", str(VOCAB),
            "--listen", f"{HOST}:{port}", "--advertise", f"{HOST}:{emulator.port}",
            "--initial-peer", self.head.address, "--wire-dtype", "float16",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.stages[node_id] = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.head.readiness() is not None:
            for node_id, proc in self.stages.items():
                if proc.poll() is not None:
                    log = (self.log_dir / f"{node_id}.log").read_text()
                    raise AssertionError(f"stage {node_id} exited:\n{log}")
            assert time.monotonic() < deadline, self.head.readiness()
            time.sleep(0.2)

    def close(self) -> None:
        self.head.close()  # first, so that it does not watch its stages go
        for proc in self.stages.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.stages.values():
            proc.wait(10)
        for emulator in self.emulators:
            emulator.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path_factory.mktemp("links"))
    try:
        cluster.head.start()
        cluster.spawn_behind("s1", "2:4", LINK_A)
        cluster.spawn_behind("s2", "4:6", LINK_B)
        cluster.wait_ready()
        _drive(cluster.head)
        time.sleep(3 * CONFIG.health_interval_s)  # the stages' reports reach the head
        yield cluster
    finally:
        cluster.close()


def _prefill(step_id: int, seq_id: int, num_tokens: int, mb: int) -> StepPlan:
    tokens = tuple(range(1, num_tokens + 1))
    blocks = tuple(range(num_tokens // 16 + 1))
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, num_tokens, blocks, True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, num_tokens, SamplingParams()),),
        micro_batch=mb,
    )


def _decode(step_id: int, seq_id: int, done: int, mb: int) -> StepPlan:
    return StepPlan(step_id, (ScheduledSequence(seq_id, done, 1, (), True),), (5,), micro_batch=mb)


def _drive(head: PipelineExecutor) -> None:
    """Like an engine with two micro-batches: prefills of various sizes, each followed by
    a few decode steps, the two slots overlapping on the links."""
    step_ids = itertools.count(1)
    seq_ids = itertools.count(1)
    sizes = itertools.cycle([96, 384, 160, 512, 256])
    plans: dict[int, Iterator[StepPlan]] = {}

    def sequence(mb: int) -> Iterator[StepPlan]:
        seq_id, size = next(seq_ids), next(sizes)
        yield _prefill(next(step_ids), seq_id, size, mb)
        for done in range(size, size + 4):
            yield _decode(next(step_ids), seq_id, done, mb)

    def submit_next(mb: int) -> None:
        plan = next(plans[mb], None)
        if plan is None:
            plans[mb] = sequence(mb)
            plan = next(plans[mb])
        head.submit(plan)

    for mb in (0, 1):
        plans[mb] = sequence(mb)
        submit_next(mb)
    remaining = 2 * 5 * 8  # eight sequences per slot
    deadline = time.monotonic() + 120
    while remaining:
        assert time.monotonic() < deadline, f"{remaining} steps still to go"
        for result in head.poll(0.2):
            _check(result)
            remaining -= 1
            if remaining >= 2:
                submit_next(result.micro_batch)


def _check(result: StepResult) -> None:
    assert result.error is None, result.error
    assert len(result.sampled) == 1


def _estimate(head: PipelineExecutor, hop: str) -> LinkEstimate:
    estimates = {e.hop: e for e in head.link_estimates()}
    assert list(estimates) == ["head->s1", "s1->s2", "s2->head"]
    return estimates[hop]


def _assert_close(measured: float, expected: float, what: str) -> None:
    assert abs(measured - expected) <= TOLERANCE * expected, (
        f"{what}: measured {measured:.4g}, emulated {expected:.4g}"
    )


@pytest.mark.parametrize(("hop", "link"), [("head->s1", LINK_A), ("s1->s2", LINK_B)])
def test_estimates_match_the_emulated_links(cluster: Cluster, hop: str, link: LinkSpec) -> None:
    estimate = _estimate(cluster.head, hop)
    assert estimate.samples >= 40
    _assert_close(estimate.rtt_s, 2 * link.delay_s, f"{hop} round trip")
    _assert_close(estimate.bandwidth_bytes_per_s, link.bytes_per_s, f"{hop} bandwidth")


def test_results_hop_is_measured_without_emulation(cluster: Cluster) -> None:
    estimate = _estimate(cluster.head, "s2->head")
    assert estimate.samples >= 40
    assert estimate.rtt_s < 0.015  # loopback; only scheduling on a busy machine adds to it
    assert math.isinf(estimate.bandwidth_bytes_per_s)  # results are never large


def test_stage_timings_and_metrics(cluster: Cluster) -> None:
    timings = cluster.head.stage_timings()
    assert [t.node_id for t in timings] == ["head", "s1", "s2"]
    assert all(t.samples >= 40 and t.compute_s_per_step > 0 for t in timings)
    assert cluster.head.hidden_bytes_per_token() == 2 * HIDDEN
    text = "\n".join(cluster.head.metric_lines())
    assert 'molink:link_bandwidth_bytes_per_second{hop="head->s1"}' in text
    assert 'molink:link_rtt_seconds{hop="s2->head"}' in text
    assert 'molink:stage_compute_seconds_per_step{node="s1"}' in text


def test_status_shows_the_estimates(cluster: Cluster) -> None:
    table = pipeline_status(cluster.head.address, CONFIG)
    assert "links (measured from the traffic):" in table
    assert "s1->s2" in table and "Mbit/s" in table and "stage compute:" in table
