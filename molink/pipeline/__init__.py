"""The pipeline runtime: stage nodes, the head's PipelineExecutor, the registry of stages.

* ``StageNode`` serves one layer range of a model behind gRPC (any node).
* ``PipelineExecutor`` is the head: it computes stage 0, drives the others, and
  implements molink.engine.executor.PlanExecutor.
* ``pipeline_status`` renders a node's view of its pipeline as a table.
"""

from molink.pipeline.head import PipelineExecutor
from molink.pipeline.head_metrics import HopCounters, PipelineMetrics
from molink.pipeline.identity import ModelIdentity, NodeInfo, model_fingerprint
from molink.pipeline.node import StageNode
from molink.pipeline.registry import JoinRefusedError, PipelineView, StageRegistry
from molink.pipeline.status import pipeline_status

__all__ = [
    "HopCounters",
    "JoinRefusedError",
    "ModelIdentity",
    "NodeInfo",
    "PipelineExecutor",
    "PipelineMetrics",
    "PipelineView",
    "StageNode",
    "StageRegistry",
    "model_fingerprint",
    "pipeline_status",
]
