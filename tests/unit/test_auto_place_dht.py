"""A node placing itself reads the DHT's records as well as its peer's pipeline."""

from __future__ import annotations

import logging

import pytest
import torch

import molink.pipeline.auto_place as auto_place
from molink.config import LayerRange, ModelConfig
from molink.placement.placement import ServedSpan
from molink.placement.resident import Held, WeightEstimate
from molink.transport.config import TransportConfig

CONFIG = ModelConfig("LlamaForCausalLM", 64, 16, 32, 6, 2, 2, 8, 1e-6, 10000.0, 128)
WEIGHTS = WeightEstimate((Held(20_000),) * 6, Held(16_000), Held(16_000), packs=False)


@pytest.fixture
def peer_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer's head knows itself and b, not c (which joined through another head)."""
    spans = {"head": ServedSpan(0, 2), "b": ServedSpan(2, 4, 20.0)}
    monkeypatch.setattr(auto_place, "_served_spans", lambda peer, transport: dict(spans))


def _place(announced: dict[str, ServedSpan] | None) -> LayerRange:
    return auto_place.place(
        "10.0.0.1:5", CONFIG, torch.float32, 16, 1 << 30, TransportConfig(), WEIGHTS, announced
    )


def test_without_the_dht_the_unknown_span_looks_missing(peer_view: None) -> None:
    assert _place(None) == LayerRange(4, 6)


def test_the_dht_shows_it_served_and_the_weakest_span_gets_the_replica(
    peer_view: None, caplog: pytest.LogCaptureFixture
) -> None:
    announced = {"c": ServedSpan(4, 6, 500.0), "b": ServedSpan(2, 4, 20.0)}
    with caplog.at_level(logging.INFO, logger="molink.pipeline.auto_place"):
        assert _place(announced) == LayerRange(2, 4)
    (line,) = [r.getMessage() for r in caplog.records]
    assert "becomes a replica" in line
    assert "2 node(s) from 10.0.0.1:5's pipeline, 2 record(s) in the DHT, 3 node(s)" in line
