"""A node remembers the nodes each head dropped from its pipeline, to refuse steps whose
route names one (a stale step, e.g. let go by a node resumed after a freeze). A swarm's
churn mints new node ids for as long as it runs: the ids remembered per head are bounded,
the ones dropped longest ago forgotten first; one that comes back is no longer dropped."""

from __future__ import annotations

from typing import Any

from molink.config import LayerRange
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.links import MAX_DROPPED_PER_HEAD, LinkTable
from molink.pipeline.registry import PipelineView

MODEL = ModelIdentity("m", "f", 2, 8, 16)
HEAD = NodeInfo("h", MODEL, LayerRange(0, 1), "127.0.0.1:1")


def _view(epoch: int, *tail: str) -> PipelineView:
    stages = [
        NodeInfo(n, MODEL, LayerRange(1, 2), f"127.0.0.1:{i + 2}") for i, n in enumerate(tail)
    ]
    return PipelineView("h", HEAD.address, epoch, 2, (HEAD, *stages))


def _table() -> LinkTable:
    def unused(address: str, node_id: str) -> Any:
        raise AssertionError("no stream is opened here")

    return LinkTable("s", unused, unused)


def test_dropped_nodes_are_bounded_oldest_forgotten_first() -> None:
    links = _table()
    epoch = 1
    links.apply(_view(epoch, "n0"))
    for i in range(1, MAX_DROPPED_PER_HEAD + 11):
        epoch += 1
        assert links.apply(_view(epoch, f"n{i}"))  # n{i} replaces n{i-1}
    dropped = links.dropped_by("h")
    assert len(dropped) == MAX_DROPPED_PER_HEAD
    # n0 .. n{M+9} were dropped: the first 10 are forgotten
    assert "n0" not in dropped and "n9" not in dropped
    assert "n10" in dropped and f"n{MAX_DROPPED_PER_HEAD + 9}" in dropped
    assert f"n{MAX_DROPPED_PER_HEAD + 10}" not in dropped  # still a member


def test_a_node_back_in_the_pipeline_is_no_longer_dropped() -> None:
    links = _table()
    links.apply(_view(1, "a", "b"))
    links.apply(_view(2, "b"))
    assert links.dropped_by("h") == {"a"}
    links.apply(_view(3, "a"))
    assert links.dropped_by("h") == {"b"}
    links.forget_head("h")
    assert links.dropped_by("h") == frozenset()
