"""Placement by speed: a replica takes layers in proportion to its measured speed against
the slowest node serving the span, memory still caps it, and layer flags still win."""

from __future__ import annotations

import argparse
import shlex
import types

import pytest
import torch

import molink.cli.stage_loader as loader
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.main import parse_engine_args
from molink.config import LayerRange, ModelConfig
from molink.discovery.records import info_of, record_of
from molink.engine.factory import EngineOptions
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from molink.placement.placement import ServedSpan, choose_span, speed_sized
from molink.stage.speed import layer_step_seconds

CONFIG = ModelConfig("LlamaForCausalLM", 64, 16, 32, 6, 2, 2, 8, 1e-6, 10000.0, 128)
SLOW_S, FAST_S = 0.004, 0.002  # seconds per layer of a probe step: FAST is twice as fast


def _full_swarm(step_s: float) -> list[ServedSpan]:
    """A 24-layer swarm whose weakest span, [4, 12), a node of speed ``step_s`` serves."""
    return [
        ServedSpan(0, 4, 100.0, FAST_S),
        ServedSpan(4, 12, 10.0, step_s),
        ServedSpan(12, 24, 50.0),
    ]


def test_a_fast_node_takes_twice_the_layers_of_a_slow_one() -> None:
    # 8 layers x 2 = 16, to the nearest layer where a route goes on: 24 (the model's end).
    fast = choose_span(24, _full_swarm(SLOW_S), max_layers=100, layer_step_s=FAST_S)
    assert (fast.start, fast.end) == (4, 24)
    assert "speed x2.00" in fast.reason and "to layer 24" in fast.reason
    # 8 layers x 0.5 = 4, but no node starts at 8: the span as served.
    slow = choose_span(24, _full_swarm(FAST_S), max_layers=100, layer_step_s=SLOW_S)
    assert (slow.start, slow.end) == (4, 12)
    assert "speed x0.50" in slow.reason
    between = [ServedSpan(0, 4), ServedSpan(4, 12, 10.0, FAST_S), ServedSpan(8, 24, 50.0)]
    half = choose_span(24, between, max_layers=100, layer_step_s=SLOW_S)
    assert (half.start, half.end) == (4, 8)  # a node starts at 8


def test_memory_still_caps_a_fast_node_and_the_model_ends_its_span() -> None:
    capped = choose_span(24, _full_swarm(SLOW_S), max_layers=12, layer_step_s=FAST_S)
    assert (capped.start, capped.end) == (4, 12)  # 16 wanted, 12 held: the span as served
    tail = [ServedSpan(0, 4), ServedSpan(4, 16, 50.0), ServedSpan(16, 24, 10.0, SLOW_S)]
    assert choose_span(24, tail, max_layers=100, layer_step_s=FAST_S).end == 24


def test_the_slowest_node_on_the_span_is_the_reference() -> None:
    swarm = [ServedSpan(0, 4), ServedSpan(4, 12, 5.0, FAST_S), ServedSpan(4, 12, 5.0, SLOW_S)]
    placement = choose_span(24, [*swarm, ServedSpan(12, 24, 50.0)], 100, layer_step_s=FAST_S)
    assert (placement.start, placement.end) == (4, 24)  # x2 against SLOW_S, not x1


def test_equal_or_unmeasured_speeds_keep_the_span_and_missing_layers_follow_memory() -> None:
    # Within the dead band (x1.25) and without a measurement on either side: the span as is.
    assert speed_sized(8, 0.005, 0.004)[0] == 8
    assert speed_sized(8, 0.0, FAST_S)[0] == 8 and speed_sized(8, SLOW_S, 0.0)[0] == 8
    assert speed_sized(8, SLOW_S, 1.0)[0] == 1  # never less than one layer
    # A missing span is taken as far as memory allows, whatever the speeds.
    missing = choose_span(24, [ServedSpan(0, 4, 1.0, FAST_S)], max_layers=7, layer_step_s=SLOW_S)
    assert (missing.start, missing.end) == (4, 11)


def _args(command: str) -> EngineArgs:
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    return parse_engine_args(parser, parser.parse_args(shlex.split(command)))


def test_layer_flags_win_over_placement_and_placement_gets_the_speed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[object, object]] = []

    def fake_place(*args: object, **kwargs: object) -> LayerRange:
        calls.append((kwargs["layer_step_s"], kwargs["tensor_parallel_size"]))
        return LayerRange(1, 2)

    monkeypatch.setattr(loader, "place", fake_place)
    monkeypatch.setattr(loader, "held_as", lambda *args: None)
    monkeypatch.setattr(loader, "estimate_weights", lambda *args: None)
    source = types.SimpleNamespace(model_config=CONFIG)
    peer = "--molink-enabled --molink-initial-peer 127.0.0.1:50061"
    options, cpu = EngineOptions(model="m"), torch.device("cpu")
    flags = _args(f"{peer} --molink-start-layer 0 --molink-end-layer 1")
    chosen = loader.stage_layers(flags, options, source, torch.float32, cpu, None, None, FAST_S)
    assert chosen == LayerRange(0, 1) and not calls
    auto = _args(peer)
    chosen = loader.stage_layers(auto, options, source, torch.float32, cpu, None, None, FAST_S)
    assert chosen == LayerRange(1, 2) and calls == [(FAST_S, 1)]
    calls.clear()
    split = EngineOptions(model="m", tensor_parallel_size=2)
    loader.stage_layers(auto, split, source, torch.float32, cpu, None, None, FAST_S)
    assert calls == [(FAST_S, 2)]  # placement sizes one rank of the two


def test_the_record_carries_the_speed_and_older_records_still_read() -> None:
    model = toy_identity(4)
    info = NodeInfo("s1", model, LayerRange(2, 4), "127.0.0.1:5", 10, 16, layer_step_s=FAST_S)
    record = record_of(info, 15.0)
    assert record["layer_step_s"] == FAST_S
    assert info_of(record, model, info.protocol_version).layer_step_s == FAST_S
    del record["layer_step_s"]
    assert info_of(record, model, info.protocol_version).layer_step_s == 0.0
    with pytest.raises(ValueError, match="'layer_step_s' is missing or not a finite number"):
        info_of({**record_of(info), "layer_step_s": float("inf")}, model, info.protocol_version)


def test_the_probe_measures_a_positive_time() -> None:
    step_s = layer_step_seconds(CONFIG, torch.float32, torch.device("cpu"))
    assert 0 < step_s < 1.0


def test_a_configured_speed_replaces_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(*args: object) -> float:
        raise AssertionError("the probe ran although the speed was configured")

    monkeypatch.setattr(loader, "layer_step_seconds", no_probe)
    pinned = _args("--molink-enabled --molink-layer-step-ms 2.5")
    cpu = torch.device("cpu")
    assert loader.node_layer_step_seconds(pinned, CONFIG, torch.float32, cpu) == 0.0025
    monkeypatch.setattr(loader, "layer_step_seconds", lambda *args: FAST_S)
    probed = _args("--molink-enabled")
    assert loader.node_layer_step_seconds(probed, CONFIG, torch.float32, cpu) == FAST_S


def test_extreme_speeds_from_a_peers_record_do_not_break_placement() -> None:
    # A record may say any finite speed; 1e308 s per layer against 1e-10 overflowed to
    # infinity and placement raised OverflowError.
    assert speed_sized(8, 1e308, 1e-10)[0] >= 8
    assert speed_sized(8, 1e-300, 1e300)[0] == 1
    swarm = [ServedSpan(0, 4), ServedSpan(4, 12, 1.0, 1e308), ServedSpan(12, 24, 50.0)]
    placement = choose_span(24, swarm, 100, 1e-10)
    assert (placement.start, placement.end) == (4, 24)
