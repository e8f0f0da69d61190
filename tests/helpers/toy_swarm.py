"""Toy swarms and hand-made plans for the tests of failover, releases and routes.

A head holding layers [0, 1) of a four-layer toy model and nodes holding the rest, all on
loopback (``toy_swarm``); plans that prefill or decode one sequence of ``PROMPT``; a
stage's compute worker driven directly, without its threads (``toy_worker``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.pipeline.worker import ComputeWorker, ReleaseJob, StepJob
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig
from tests.helpers.polling import wait_until

MODEL = toy_identity(4)
CONFIG = TransportConfig(step_timeout_s=30.0, health_interval_s=60.0, lease_s=200.0)
PROMPT = (1, 2, 3)

# (node id, first layer, end layer) of the nodes after the head.
Spans = tuple[tuple[str, int, int], ...]
REPLICAS_BEFORE_N: Spans = (("a", 1, 2), ("b", 1, 2), ("n", 2, 4))


def node_info(node_id: str, start: int, end: int) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), "127.0.0.1:0")


def prefill(
    step_id: int, seq_id: int, finished: tuple[int, ...] = (), micro_batch: int = 0
) -> StepPlan:
    """The whole of ``PROMPT`` for a sequence the nodes have not seen, greedy."""
    return StepPlan(
        step_id,
        (ScheduledSequence(seq_id, 0, len(PROMPT), (), True),),
        PROMPT,
        (NewSequenceData(seq_id, PROMPT, len(PROMPT), SamplingParams(temperature=0.0)),),
        finished_seq_ids=finished,
        micro_batch=micro_batch,
    )


def decode(step_id: int, seq_id: int, token: int, finished: tuple[int, ...] = ()) -> StepPlan:
    """The first token after ``PROMPT``'s prefill."""
    return StepPlan(
        step_id,
        (ScheduledSequence(seq_id, len(PROMPT), 1, (), True),),
        (token,),
        finished_seq_ids=finished,
    )


@dataclass
class ToySwarm:
    head: PipelineExecutor
    executors: dict[str, ToyStageExecutor]
    nodes: dict[str, StageNode]


@contextmanager
def toy_swarm(spans: Spans, config: TransportConfig = CONFIG) -> Iterator[ToySwarm]:
    """A head of [0, 1) and one node per span, joined and ready; stopped on exit."""
    head = PipelineExecutor(ToyStageExecutor(LayerRange(0, 1), MODEL), node_info("h", 0, 1), config)
    head.start()
    executors: dict[str, ToyStageExecutor] = {}
    nodes: dict[str, StageNode] = {}
    try:
        for node_id, start, end in spans:
            executors[node_id] = ToyStageExecutor(LayerRange(start, end), MODEL)
            info = node_info(node_id, start, end)
            node = StageNode(executors[node_id], info, config, initial_peer=head.address)
            nodes[node_id] = node.start()
        ready = len(spans) + 1
        assert wait_until(lambda: len(head.pipeline().stages) == ready and head.readiness() is None)
        yield ToySwarm(head, executors, nodes)
    finally:
        for node in nodes.values():
            node.stop()
        head.close()


def toy_worker(
    executor: ToyStageExecutor | None = None,
    on_error: Callable[[StepJob, str, FailureKind], None] = lambda job, message, kind: None,
    on_release: Callable[[ReleaseJob], None] = lambda job: None,
) -> ComputeWorker:
    """Node "s"'s compute worker (by default over layers [1, 2)); tests call its step and
    release handlers themselves."""
    return ComputeWorker(
        executor or ToyStageExecutor(LayerRange(1, 2), MODEL),
        "s",
        on_output=lambda out: None,
        on_error=on_error,
        on_release=on_release,
        max_queued=8,
        upstream_stall_s=60.0,
    )


def hidden(plan: StepPlan) -> torch.Tensor:
    """The activations a plan brings to a node after the head (zeros)."""
    return torch.zeros(plan.num_tokens, MODEL.hidden_size)
