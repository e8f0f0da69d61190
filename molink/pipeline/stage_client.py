"""The engine a stage-only node gives its HTTP server (molink.engine.protocol.EngineClient)."""

from __future__ import annotations

from molink.engine.protocol import EngineStats
from molink.errors import ModelNotReadyError
from molink.pipeline.identity import NodeInfo
from molink.pipeline.node import StageNode


class StageOnlyClient:
    """What a non-head node offers its HTTP server: health, and a pointer to the head."""

    def __init__(self, node: StageNode, info: NodeInfo, tokenizer_like, max_model_len: int):
        self.node = node
        self.model_name = info.model.served_name
        self.max_model_len = max_model_len
        self.tokenizer = tokenizer_like
        self._info = info

    @property
    def info(self) -> NodeInfo:
        return self._info

    def readiness(self) -> str | None:
        """This node's own health (its /health, a liveness probe's answer): None while it
        is part of a pipeline, whatever the rest of the pipeline is doing."""
        if self.node.current_view() is None:
            return f"stage {self._info.node_id} is not part of a pipeline (it is joining)"
        return None

    async def generate(self, request_id, prompt, params):
        raise ModelNotReadyError(
            f"this node is a pipeline stage serving layers [{self._info.layers.start}, "
            f"{self._info.layers.end}); send requests to the head of the pipeline"
        )
        yield

    async def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, self._info.num_kv_blocks, self._info.num_kv_blocks)

    def metric_lines(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        self.node.stop()
