"""Choosing the SwarmProvider for an engine: a pipeline head, a stage, or a single process.

The head's provider is molink.dashboard.pipeline_provider; a stage shows the pipeline as
its head last reported it; a single process is one node holding every layer.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from molink.dashboard.pipeline_provider import HeadView, PipelineSwarmProvider
from molink.dashboard.snapshot import NodeView, SwarmSnapshot
from molink.engine.protocol import EngineClient

if TYPE_CHECKING:
    # Annotations only (see molink.dashboard.pipeline_provider: no gRPC on a single node).
    from molink.pipeline.registry import PipelineView


class StaticSwarmProvider:
    """One process holding layers [0, num_layers) (or nothing known: zero layers)."""

    def __init__(self, model: str, num_layers: int, node_id: str = "local") -> None:
        self._model = model
        self._num_layers = num_layers
        self._node_id = node_id

    def route(self) -> tuple[str, ...]:
        return (self._node_id,) if self._num_layers else ()

    def snapshot(self) -> SwarmSnapshot:
        nodes = ()
        if self._num_layers:
            node = NodeView(
                self._node_id, "", 0, self._num_layers, "alive", is_head=True, record_age_s=0.0
            )
            nodes = (node,)
        return SwarmSnapshot(
            self._model, self._num_layers, nodes, routes=(self.route(),), taken_at=time.time()
        )


class StageSwarmProvider:
    """On a stage (not the head): the pipeline as the head last told this node. The head
    checks health, so the stages it lists are those it considers up."""

    def __init__(self, node_id: str, num_layers: int, view: Callable[[], PipelineView | None]):
        self._node_id = node_id
        self._num_layers = num_layers
        self._view = view

    def route(self) -> tuple[str, ...]:
        view = self._view()
        return tuple(s.node_id for s in view.stages) if view and not view.readiness() else ()

    def snapshot(self) -> SwarmSnapshot:
        view = self._view()
        stages = view.stages if view else ()
        nodes = tuple(
            NodeView(
                node_id=s.node_id,
                address=s.address,
                start=s.layers.start,
                end=s.layers.end,
                health="alive",
                detail="" if s.node_id == self._node_id else "as last reported by the head",
                dtype=s.dtype,
                device=s.device,
                kv_total_tokens=s.kv_capacity_tokens,
                is_head=view is not None and s.node_id == view.head_id,
            )
            for s in stages
        )
        route = self.route()
        return SwarmSnapshot(
            stages[0].model.served_name if stages else "",
            self._num_layers,
            nodes,
            routes=(route,) if route else (),
            taken_at=time.time(),
        )


SwarmProviders = PipelineSwarmProvider | StaticSwarmProvider | StageSwarmProvider


def provider_for(engine: EngineClient) -> SwarmProviders:
    """The head's pipeline when ``engine`` drives one; on a stage, the pipeline as the head
    last told it; else the single process (layers counted from its stages)."""
    from molink.engine.async_engine import AsyncLLMEngine
    from molink.engine.local_executor import LocalExecutor
    from molink.stage.worker import StageWorker

    # A stage's client exists only once its module is loaded; importing it to find out would
    # load gRPC and the TLS stack into every single-node server.
    stage_client = sys.modules.get("molink.pipeline.stage_client")
    if stage_client is not None and isinstance(engine, stage_client.StageOnlyClient):
        info = engine.info
        return StageSwarmProvider(info.node_id, info.model.num_layers, engine.node.current_view)
    if not isinstance(engine, AsyncLLMEngine):
        return StaticSwarmProvider(engine.model_name, 0)
    executor = engine.engine.executor
    if isinstance(executor, HeadView):
        return PipelineSwarmProvider(executor, engine.stats)
    ends = []
    if isinstance(executor, LocalExecutor):
        ends = [s.layer_range.end for s in executor.stages if isinstance(s, StageWorker)]
    return StaticSwarmProvider(engine.model_name, max(ends, default=0))
