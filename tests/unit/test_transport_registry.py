"""The head's registry: join refusals, the route, missing layer ranges."""

from __future__ import annotations

import dataclasses

import pytest

from molink.config import LayerRange
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.registry import (
    JoinRefusedError,
    StageRegistry,
    missing_message,
    missing_ranges,
)
from molink.pipeline.wire import node_from_proto, node_to_proto, view_from_proto, view_to_proto
from molink.transport import PROTOCOL_VERSION

MODEL = ModelIdentity("org/model", "abc123", num_layers=40, hidden_size=64, vocab_size=1000)


def _node(node_id: str, start: int, end: int, **changes: object) -> NodeInfo:
    info = NodeInfo(node_id, MODEL, LayerRange(start, end), f"10.0.0.{start}:5000", 100, 16)
    return dataclasses.replace(info, **changes)


@pytest.fixture
def registry() -> StageRegistry:
    return StageRegistry(_node("head", 0, 10))


def test_missing_ranges_are_named(registry: StageRegistry) -> None:
    assert registry.view().readiness() == "layers [10, 40) are not served by any node"
    registry.join(_node("b", 20, 30))
    assert registry.view().readiness() == (
        "layers [10, 20) and [30, 40) are not served by any node"
    )
    registry.join(_node("a", 10, 20))
    registry.join(_node("c", 30, 40))
    assert registry.view().readiness() is None


def test_missing_ranges_of_three_gaps() -> None:
    gaps = missing_ranges([LayerRange(2, 4), LayerRange(6, 8)], 10)
    assert gaps == [LayerRange(0, 2), LayerRange(4, 6), LayerRange(8, 10)]
    assert missing_message(gaps) == "layers [0, 2), [4, 6) and [8, 10) are not served by any node"
    assert missing_message([]) is None


def test_nodes_are_ordered_by_start_layer(registry: StageRegistry) -> None:
    registry.join(_node("c", 30, 40))
    registry.join(_node("a", 10, 30))
    view = registry.view()
    assert [s.node_id for s in view.stages] == ["head", "a", "c"]


def test_every_change_bumps_the_epoch(registry: StageRegistry) -> None:
    first = registry.view().epoch
    registry.join(_node("a", 10, 20))
    assert registry.view().epoch == first + 1
    registry.remove("a")
    assert registry.view().epoch == first + 2
    assert registry.remove("a") is None and registry.view().epoch == first + 2
    assert registry.remove("head") is None


@pytest.mark.parametrize(
    "node,expected",
    [
        (
            _node("a", 10, 20, model=dataclasses.replace(MODEL, fingerprint="zzz")),
            "model mismatch: node 'a' serves 'org/model' \\(fingerprint zzz\\)",
        ),
        (
            _node("a", 10, 20, model=dataclasses.replace(MODEL, served_name="other")),
            "model mismatch: node 'a' serves 'other'",
        ),
        (
            _node("a", 10, 20, model=dataclasses.replace(MODEL, num_layers=32)),
            "layer count mismatch: node 'a' has a 32-layer model, head 'head' has 40 layers",
        ),
        (
            _node("a", 10, 20, protocol_version=99),
            f"protocol version mismatch: node 'a' speaks v99, head 'head' speaks v{PROTOCOL_VERSION}",
        ),
        (
            _node("a", 10, 50),
            r"layer range \[10, 50\) of node 'a' is not a non-empty part of \[0, 40\)",
        ),
        (_node("a", 20, 20), r"layer range \[20, 20\)"),
        (
            _node("a", 10, 20, block_size=32),
            "KV block size mismatch: node 'a' uses 32, head 'head' uses 16",
        ),
        (_node("head", 10, 20), "is the head's own id"),
        (_node("", 10, 20), "empty node id"),
        (_node("a", 10, 20, address=""), "advertises no address"),
        (
            _node("a", 10, 20, address="x" * 513),
            "field address of a joining node has 513 characters, at most 512",
        ),
        (_node("a", 10, 20, device="cpu\x1b[2J"), "field device of a joining node holds control"),
        (_node("a", 10, 20, public_key=b"k" * 1025), "public_key of a joining node has 1025 bytes"),
        # As in a DHT record: the router and placement read these speeds.
        (
            _node("a", 10, 20, throughput_tokens_per_s=float("nan")),
            "field throughput_tokens_per_s of a joining node is nan: a finite number >= 0",
        ),
        (_node("a", 10, 20, layer_step_s=float("inf")), "field layer_step_s .* is inf"),
        (_node("a", 10, 20, layer_step_s=-1.0), "field layer_step_s .* is -1.0"),
    ],
)
def test_join_refusals_say_why(registry: StageRegistry, node: NodeInfo, expected: str) -> None:
    with pytest.raises(JoinRefusedError, match=expected):
        registry.join(node)
    assert [s.node_id for s in registry.view().stages] == ["head"]


def test_replicas_and_overlapping_spans_are_welcome(registry: StageRegistry) -> None:
    registry.join(_node("a", 10, 20))
    registry.join(_node("b", 15, 25))
    registry.join(_node("a2", 10, 20, address="10.0.0.11:5000"))
    assert [s.node_id for s in registry.overlapping(_node("x", 12, 16))] == ["a", "b", "a2"]
    assert registry.view().readiness() == "layers [25, 40) are not served by any node"


def test_a_node_may_rejoin_under_its_own_id(registry: StageRegistry) -> None:
    registry.join(_node("a", 10, 20))
    registry.join(_node("a", 10, 25, address="10.0.0.99:5000"))
    stage = registry.view().stage("a")
    assert stage is not None and stage.address == "10.0.0.99:5000" and stage.layers.end == 25


def test_min_kv_blocks_is_the_smallest_stage(registry: StageRegistry) -> None:
    registry.join(_node("a", 10, 40, num_kv_blocks=40))
    assert registry.view().min_kv_blocks() == 40


def test_node_and_view_round_trip_through_proto(registry: StageRegistry) -> None:
    registry.join(_node("a", 20, 40))
    view = registry.view()
    assert view_from_proto(view_to_proto(view)) == view
    assert list(view_to_proto(view).missing)[0].start == 10
    assert node_from_proto(node_to_proto(view.stages[1])) == view.stages[1]


def test_fingerprint_tells_shapes_apart() -> None:
    from molink.config import ModelConfig
    from molink.pipeline.identity import model_fingerprint

    base = ModelConfig("LlamaForCausalLM", 1000, 64, 128, 4, 4, 2, 16, 1e-6, 1e4, 512)
    assert model_fingerprint(base) == model_fingerprint(dataclasses.replace(base))
    assert model_fingerprint(base) != model_fingerprint(dataclasses.replace(base, hidden_size=128))
    identity = ModelIdentity.from_model_config("m", base)
    assert (identity.num_layers, identity.hidden_size, identity.vocab_size) == (4, 64, 1000)


def test_a_pipeline_holds_at_most_max_nodes() -> None:
    """Any member can make itself fresh ids; each node is pushed to every stage with every
    change, so a pipeline holds a bounded number (a node already in may join again)."""
    registry = StageRegistry(_node("head", 0, 10), max_nodes=3)
    registry.join(_node("a", 10, 40))
    registry.join(_node("b", 10, 40))
    with pytest.raises(JoinRefusedError, match=r"already holds 3 nodes \(max_pipeline_nodes\)"):
        registry.join(_node("minted", 10, 40))
    registry.join(_node("a", 10, 20))  # a rejoin takes no more room
    registry.remove("b")
    registry.join(_node("minted", 10, 40))
    assert {s.node_id for s in registry.view().stages} == {"head", "a", "minted"}
