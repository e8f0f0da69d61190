"""A node's device and memory as its record reports them, and its measured throughput."""

from __future__ import annotations

import pytest
import torch

from molink.pipeline.worker import ThroughputMeter
from molink.stage.resources import device_of, host_memory, memory_of


def test_a_cpu_module_reports_the_hosts_memory() -> None:
    module = torch.nn.Linear(2, 2)
    assert device_of(module) == "cpu"
    assert device_of(torch.nn.Module()) == "cpu"
    memory = memory_of("cpu")
    assert 0 < memory.free_bytes <= memory.total_bytes
    assert host_memory().total_bytes == memory.total_bytes


def test_throughput_is_zero_until_measured_then_follows_recent_passes() -> None:
    meter = ThroughputMeter()
    assert meter.tokens_per_s == 0.0
    meter.add(100, 1.0)
    assert meter.tokens_per_s == pytest.approx(100.0)
    for _ in range(200):
        meter.add(10, 1.0)
    assert meter.tokens_per_s == pytest.approx(10.0, rel=1e-6)
