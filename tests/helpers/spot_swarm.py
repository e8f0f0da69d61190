"""An in-process swarm for spot-check tests: a head [0, 1) and stages [1, 2) and [2, 4)
as threads of this process, members of one swarm, toy executors, float32 on the wire,
F = 1; one span served by three replicas, one of which lies."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.transport.config import TransportConfig
from tests.helpers.polling import wait_until

# A vocabulary that divides the shadow id offsets: the toy's tokens depend on sequence ids.
MODEL = toy_identity(4, vocab_size=1024)
KEY = generate_swarm_key()

# How much each lie adds to the hidden states: 0.6 changes a toy token (values are rounded
# to pick one), 0.05 none, yet it is far beyond float32 rounding.
PERTURBATIONS = {"perturbed-hidden-states": 0.6, "slightly-perturbed-hidden-states": 0.05}


class SwitchableExecutor(ToyStageExecutor):
    """Honest until told to lie: ``lie`` perturbs the hidden states (PERTURBATIONS) or
    returns the next token instead of the computed one. ``noise`` multiplies every hidden
    value by 1 + u * noise (u uniform in [-1, 1]): what another device's or batch's
    rounding does to an honest answer."""

    lie: str | None = None
    noise: float = 0.0

    def execute(self, plan, hidden, head_id=""):
        out = super().execute(plan, hidden, head_id)
        if isinstance(out, torch.Tensor) and self.noise:
            out = out * (1 + (torch.rand_like(out) * 2 - 1) * self.noise)
        if self.lie in PERTURBATIONS:
            return out + PERTURBATIONS[self.lie]
        if self.lie == "wrong-tokens":
            sampled = tuple(dataclasses.replace(s, token_id=s.token_id + 1) for s in out.sampled)
            return dataclasses.replace(out, sampled=sampled)
        return out


def member() -> TransportConfig:
    return TransportConfig(
        step_timeout_s=10.0, rpc_timeout_s=3.0, security=SwarmCredentials.from_key(KEY)
    )


def node_info(config: TransportConfig, start: int, end: int) -> NodeInfo:
    node_id = config.security.node_id
    return NodeInfo(node_id, MODEL, LayerRange(start, end), "127.0.0.1:0", wire_dtype="float32")


def start_head(config: TransportConfig) -> PipelineExecutor:
    """The head [0, 1), checking every sequence (F = 1)."""
    executor = ToyStageExecutor(LayerRange(0, 1), MODEL)
    return PipelineExecutor(executor, node_info(config, 0, 1), config, verify_fraction=1.0).start()


def wait_for_five_nodes(head: PipelineExecutor) -> None:
    assert wait_until(lambda: len(head.pipeline().stages) == 5 and head.readiness() is None)


@dataclasses.dataclass
class Swarm:
    head: PipelineExecutor
    liar: StageNode
    nodes: list[StageNode]
    lie: str
    role: str


@contextlib.contextmanager
def lying_swarm(lie: str, lying_span: tuple[int, int], role: str) -> Iterator[Swarm]:
    """Three replicas of ``lying_span``, the other span served once. The liar is the
    replica new sequences are routed to (``role`` "primary") or another one ("check": it
    then answers checks only). Every node is stopped on the way out."""
    head = start_head(member())
    nodes: list[StageNode] = []
    executors: dict[str, SwitchableExecutor] = {}
    try:
        for start, end in ((1, 2), (2, 4)):
            for _ in range(3 if (start, end) == lying_span else 1):
                config = member()
                executor = SwitchableExecutor(LayerRange(start, end), MODEL)
                info = node_info(config, start, end)
                nodes.append(StageNode(executor, info, config, initial_peer=head.address).start())
                executors[info.node_id] = executor
        wait_for_five_nodes(head)
        routed = {n.node_id for n in head.route_nodes()}
        replicas = [n for n in nodes if (n.info.layers.start, n.info.layers.end) == lying_span]
        liar = next(n for n in replicas if (n.node_id in routed) == (role == "primary"))
        executors[liar.node_id].lie = lie
        yield Swarm(head, liar, nodes, lie, role)
    finally:
        for node in nodes:
            node.stop()
        head.close()
