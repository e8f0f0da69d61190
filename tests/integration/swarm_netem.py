"""A head in this process and toy replicas of its tail behind emulated links (shared by the
routing test and the routing benchmark).

Each replica is a ``molink.pipeline.toy`` process that advertises its link emulator's port,
so the head (and anyone else) reaches it through the emulated link. Every wait is bounded,
every child is killed and every emulator stopped in ``close``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from molink.config import LayerRange
from molink.netem import LinkEmulator, LinkSpec
from molink.pipeline import NodeInfo, PipelineExecutor
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig
from tests.helpers.server_process import free_port

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
NUM_LAYERS = 6
HEAD_END = 2
HIDDEN = 1024  # 2 KiB per token in float16: a prompt's activations take a while at 20 Mbit/s
VOCAB = 1000
START_TIMEOUT_S = 120.0
CONFIG = TransportConfig(step_timeout_s=60.0, health_interval_s=0.5, health_timeout_s=3.0)


class ReplicaSwarm:
    """head [0, 2) here; replicas of [2, 6) as processes, each behind its own link."""

    def __init__(self, log_dir: Path, config: TransportConfig = CONFIG) -> None:
        self.log_dir = log_dir
        self.model = toy_identity(NUM_LAYERS, hidden_size=HIDDEN, vocab_size=VOCAB)
        layers = LayerRange(0, HEAD_END)
        info = NodeInfo("head", self.model, layers, f"{HOST}:0", wire_dtype="float16")
        self.head = PipelineExecutor(ToyStageExecutor(layers, self.model), info, config)
        self.replicas: dict[str, subprocess.Popen] = {}
        self.emulators: dict[str, LinkEmulator] = {}
        self._step_ids = itertools.count(1)
        self._seq_ids = itertools.count(1)

    def start(self) -> ReplicaSwarm:
        self.head.start()
        return self

    def spawn_replica(self, node_id: str, link: LinkSpec, delay_s: float = 0.0) -> None:
        port = free_port()
        emulator = LinkEmulator(HOST, 0, HOST, port, up=link).start()
        self.emulators[node_id] = emulator
        log = open(self.log_dir / f"{node_id}.log", "w")  # noqa: SIM115 - closed with the child
        cmd = [
            sys.executable, "-m", "molink.pipeline.toy", "--node-id", node_id,
            "--layers", f"{HEAD_END}:-1", "--num-layers", str(NUM_LAYERS),
            "--hidden-size", str(HIDDEN), "--vocab-size", str(VOCAB),
            "--listen", f"{HOST}:{port}", "--advertise", f"{HOST}:{emulator.port}",
            "--initial-peer", self.head.address, "--wire-dtype", "float16",
            "--delay", str(delay_s),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.replicas[node_id] = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env
        )

    def wait_measured(self, node_ids: set[str]) -> None:
        """Until the head knows every replica named and has measured its round trip."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            nodes = {n.node_id: n for n in self.head.swarm.snapshot().nodes}
            if node_ids <= set(nodes) and all(nodes[n].rtt_s > 0 for n in node_ids):
                return
            self._check_children()
            assert time.monotonic() < deadline, f"the head knows {sorted(nodes)}"
            time.sleep(0.2)

    def kill(self, node_id: str) -> None:
        self.replicas[node_id].kill()
        self.replicas[node_id].wait(10)
        deadline = time.monotonic() + 60
        while any(s.node_id == node_id for s in self.head.pipeline().stages):
            assert time.monotonic() < deadline, f"the head still routes through {node_id}"
            time.sleep(0.2)

    def route_choices(self) -> dict[str, int]:
        return self.head.routes.route_choices_snapshot()

    def run_sequences(
        self, count: int, prompt_tokens: int, decode_steps: int, in_flight: int = 2
    ) -> list[tuple[float, list[float]]]:
        """``count`` sequences, ``in_flight`` at a time (one micro-batch each): a prefill of
        ``prompt_tokens`` then ``decode_steps`` decodes, each result checked against the toy's
        arithmetic; each sequence is released when done. Returns, per sequence, the time to
        its first token and the gaps between its later tokens."""
        timeline: list[tuple[float, list[float]]] = []
        active = {mb: self._sequence(mb, prompt_tokens, decode_steps) for mb in range(in_flight)}
        started = dict.fromkeys(active, time.monotonic())
        stamps: dict[int, list[float]] = {mb: [] for mb in active}
        expected: dict[int, int] = {}
        for mb, steps in active.items():
            expected[mb] = self._submit(next(steps))
        begun, deadline = in_flight, time.monotonic() + 300
        while active:
            assert time.monotonic() < deadline, f"{len(active)} sequences still running"
            for result in self.head.poll(0.2):
                mb = result.micro_batch
                assert result.error is None, result.error
                assert [t.token_id for t in result.sampled] == [expected[mb]], result
                stamps[mb].append(time.monotonic())
                step = next(active[mb], None)
                if step is not None:
                    expected[mb] = self._submit(step)
                    continue
                times = [started[mb], *stamps[mb]]
                timeline.append(
                    (times[1] - times[0], [b - a for a, b in itertools.pairwise(times[1:])])
                )
                del active[mb]
                if begun < count:
                    begun += 1
                    active[mb] = self._sequence(mb, prompt_tokens, decode_steps)
                    started[mb], stamps[mb] = time.monotonic(), []
                    expected[mb] = self._submit(next(active[mb]))
        return timeline

    def _submit(self, step: tuple[StepPlan, int]) -> int:
        plan, token = step
        self.head.submit(plan)
        return token

    def _sequence(
        self, mb: int, prompt_tokens: int, decode_steps: int
    ) -> Iterator[tuple[StepPlan, int]]:
        """Each step with the token the toy model samples for it; releases at the end."""
        seq_id = next(self._seq_ids)
        tokens = tuple(range(1, prompt_tokens + 1))
        new = NewSequenceData(seq_id, tokens, prompt_tokens, SamplingParams())
        last = expected_token(tokens[-1], seq_id, NUM_LAYERS, VOCAB)
        first = StepPlan(
            next(self._step_ids),
            (ScheduledSequence(seq_id, 0, prompt_tokens, (), True),),
            tokens,
            new_sequences=(new,),
            micro_batch=mb,
        )
        yield first, last
        for done in range(prompt_tokens, prompt_tokens + decode_steps):
            step = ScheduledSequence(seq_id, done, 1, (), True)
            token = expected_token(last, seq_id, NUM_LAYERS, VOCAB)
            yield StepPlan(next(self._step_ids), (step,), (last,), micro_batch=mb), token
            last = token
        self.head.release([seq_id])

    def _check_children(self) -> None:
        for node_id, proc in self.replicas.items():
            if proc.poll() is not None and proc.returncode != -9:
                log = (self.log_dir / f"{node_id}.log").read_text()
                raise AssertionError(f"replica {node_id} exited:\n{log[-3000:]}")

    def close(self) -> None:
        self.head.close()
        for proc in self.replicas.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.replicas.values():
            proc.wait(10)
        for emulator in self.emulators.values():
            emulator.stop()
