"""Spot checks on a real (tiny, random) model in float32 with float32 on the wire, where
the tolerance is tightest: the head's stage [0, 1), three honest replicas of [1, 2) and a
last stage, threads of this process. With F = 1 four greedy sequences, started in two
prefills of different sizes (the router may send them along different replicas, so that
a replica computes re-runs in other batches than the primary did) and run as two
micro-batches in flight, decode for 10 steps; every checked step's hidden rows and tokens
are compared, none disagree and nobody is banned."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.identity import ModelIdentity
from molink.sampling_params import SamplingParams
from molink.stage.worker import StageWorker
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.weights import resolve_model_source
from tests.helpers.polling import results_of, wait_until

REAL_MODEL_WAIT_S = 60.0  # real forward passes on a loaded 2-core machine

BLOCK_SIZE = 4
NUM_BLOCKS = 256
GREEDY = SamplingParams(temperature=0.0, max_tokens=32)
PROMPTS = {1: [5, 9, 13, 2, 7], 2: [3, 3, 8], 3: [11, 4, 6, 1, 1, 9, 30], 4: [21, 22]}


def _blocks(seq_id: int, start: int, count: int) -> tuple[int, ...]:
    """The head's own blocks: sequence ``s`` owns ``16 s`` .. ``16 s + 15``."""
    first, last = start // BLOCK_SIZE, (start + count - 1) // BLOCK_SIZE
    have = -(-start // BLOCK_SIZE)
    return tuple(16 * seq_id + b for b in range(max(first, have), last + 1))


def _tokens_of(results: list[StepResult]) -> dict[int, int]:
    """Each sequence's sampled token from the results of steps in flight together."""
    for result in results:
        assert result.error is None, result.error
    return {t.seq_id: t.token_id for result in results for t in result.sampled}


def _prefill(step_id: int, seq_ids: list[int]) -> StepPlan:
    scheduled, tokens, new = [], [], []
    for seq_id in seq_ids:
        prompt = PROMPTS[seq_id]
        blocks = _blocks(seq_id, 0, len(prompt))
        scheduled.append(ScheduledSequence(seq_id, 0, len(prompt), blocks, sample=True))
        tokens += prompt
        new.append(NewSequenceData(seq_id, tuple(prompt), len(prompt), GREEDY))
    return StepPlan(step_id, tuple(scheduled), tuple(tokens), tuple(new))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("llama")


def test_honest_replicas_of_a_real_model_are_never_banned(model_dir: Path) -> None:
    source = resolve_model_source(str(model_dir))
    config = source.model_config
    identity = ModelIdentity.from_model_config("tiny", config)
    # Health checks keep the stages' leases on the head renewed under any load.
    transport = TransportConfig(step_timeout_s=60.0, health_interval_s=1.0, lease_s=120.0)

    def worker(layers: LayerRange) -> StageWorker:
        """The head's stage uses the plans' blocks; the others allocate their own."""
        model = source.load_slice(layers, "float32")
        owns = layers.start > 0
        return StageWorker(
            model, config, layers, NUM_BLOCKS, BLOCK_SIZE, torch.float32, owns_blocks=owns
        )

    def info(node_id: str, layers: LayerRange) -> NodeInfo:
        return NodeInfo(node_id, identity, layers, "127.0.0.1:0", wire_dtype="float32")

    head = PipelineExecutor(
        worker(LayerRange(0, 1)),
        info("head", LayerRange(0, 1)),
        transport,
        input_dtype=torch.float32,
        verify_fraction=1.0,
    ).start()
    nodes: list[StageNode] = []
    try:
        last = LayerRange(2, config.num_layers)
        for node_id, layers in (("a", LayerRange(1, 2)), ("b", LayerRange(1, 2))) + (
            ("c", LayerRange(1, 2)),
            ("z", last),
        ):
            node = StageNode(
                worker(layers),
                info(node_id, layers),
                transport,
                initial_peer=head.address,
                input_dtype=torch.float32,
            )
            nodes.append(node.start())
        assert wait_until(
            lambda: len(head.pipeline().stages) == 5 and head.readiness() is None, REAL_MODEL_WAIT_S
        )
        groups = ([1, 2, 3], [4])  # each may take its own route: two micro-batches in flight
        for slot, group in enumerate(groups):  # step ids 0 and 1, one micro-batch slot each
            head.submit(dataclasses.replace(_prefill(slot, group), micro_batch=slot))
        tokens = _tokens_of(results_of(head, len(groups), REAL_MODEL_WAIT_S))
        step = len(groups)
        done = {s: len(p) for s, p in PROMPTS.items()}
        for _ in range(10):
            for slot, group in enumerate(groups):
                scheduled = tuple(
                    ScheduledSequence(s, done[s], 1, _blocks(s, done[s], 1), True) for s in group
                )
                inputs = tuple(tokens[s] for s in group)
                head.submit(StepPlan(step, scheduled, inputs, micro_batch=slot))
                step += 1
            tokens.update(_tokens_of(results_of(head, len(groups), REAL_MODEL_WAIT_S)))
            done = {s: n + 1 for s, n in done.items()}
        pairs = 3 * step
        assert wait_until(lambda: sum(head._spot.bans.counts()) >= pairs, REAL_MODEL_WAIT_S)
        assert head._spot.bans.counts() == (pairs, 0)
        assert head.banned_nodes() == {}
        metrics = "\n".join(head.metric_lines())
        assert f'molink_spot_check_hidden_total{{outcome="compared"}} {step}' in metrics
    finally:
        for node in nodes:
            node.stop()
        head.close()
