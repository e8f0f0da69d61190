"""The benchmark plumbing: server subprocesses, /metrics parsing, results files, settings."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bench.common
from bench import serving_bench
from bench.common import (
    free_port,
    machine_info,
    metric_total,
    metrics_delta,
    parse_prometheus_text,
    running_server,
    write_results,
)
from tests.unit.test_loadgen_live import FakeServer

METRICS_TEXT = """\
# HELP molink:generation_tokens_total Generated tokens.
# TYPE molink:generation_tokens_total counter
molink:generation_tokens_total{model_name="m"} 120.0
molink:request_success_total{finished_reason="stop",model_name="m"} 3.0
molink:request_success_total{finished_reason="length",model_name="m"} 5.0
molink:time_to_first_token_seconds_bucket{model_name="m",le="0.1"} 2
molink:time_to_first_token_seconds_sum{model_name="m"} 0.75
molink:num_requests_running{model_name="m"} 4
molink:odd{path="a \\"q\\" b"} 1e3
process_start_time_seconds 1.7e9 1700000000000
not a metric line
"""


def test_prometheus_text_is_parsed() -> None:
    metrics = parse_prometheus_text(METRICS_TEXT)
    assert metrics['molink:generation_tokens_total{model_name="m"}'] == 120.0
    key = 'molink:request_success_total{finished_reason="length",model_name="m"}'
    assert metrics[key] == 5.0
    assert metrics['molink:time_to_first_token_seconds_bucket{le="0.1",model_name="m"}'] == 2
    assert metrics['molink:odd{path="a \\"q\\" b"}'] == 1000.0
    assert metrics["process_start_time_seconds"] == 1.7e9
    assert metric_total(metrics, "molink:request_success_total") == 8.0
    assert metric_total(metrics, "molink:absent") == 0.0


def test_metrics_delta_keeps_counters_only() -> None:
    before = parse_prometheus_text(METRICS_TEXT)
    after = dict(before)
    after['molink:generation_tokens_total{model_name="m"}'] = 200.0
    after['molink:num_requests_running{model_name="m"}'] = 9.0
    delta = metrics_delta(before, after)
    assert delta['molink:generation_tokens_total{model_name="m"}'] == 80.0
    assert 'molink:num_requests_running{model_name="m"}' not in delta
    assert delta['molink:time_to_first_token_seconds_sum{model_name="m"}'] == 0.0


def test_running_server_waits_for_health_and_stops(tmp_path: Path) -> None:
    (tmp_path / "health").write_text("ok")
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
               "--directory", str(tmp_path)]  # fmt: skip
    with running_server(command, port, startup_timeout_s=30.0) as server:
        assert server.process.poll() is None
    assert server.process.poll() is not None


def test_a_server_that_dies_is_reported(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="no model here"):
        with running_server(command, free_port(), startup_timeout_s=30.0):
            pass


def test_results_carry_machine_info(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing torch takes seconds on a small machine; the record's shape is what matters.
    stub = {"torch_version": "x", "torch_threads": 2, "cuda_device": None}
    monkeypatch.setattr(bench.common, "_torch_info", lambda: stub)
    path = write_results("demo", {"value": 1}, results_dir=tmp_path)
    document = json.loads(path.read_text())
    assert document["benchmark"] == "demo" and document["value"] == 1
    for key in ("cpu_count", "torch_threads", "torch_version", "python", "date"):
        assert key in document["machine"]
    assert machine_info()["cpu_count"] >= 1


def test_serve_flags_are_accepted_by_molink_serve() -> None:
    from molink.cli.main import build_parser

    settings = serving_bench.EngineSettings(model="/tmp/some-model")
    args = build_parser().parse_args(["serve", "--port", "1234", *settings.serve_flags()])
    assert (args.num_threads, args.dtype, args.model) == (2, "float32", "/tmp/some-model")
    assert args.kv_cache_memory == 512 * 1024 * 1024


def test_offline_options_are_engine_options() -> None:
    from molink.engine.factory import EngineOptions

    names = {field.name for field in dataclasses.fields(EngineOptions)}
    assert set(serving_bench.EngineSettings().offline_options()) <= names


def test_http_overhead_arithmetic() -> None:
    runs = [
        {"rate": 4.0, "summary": {"output_throughput": 50.0}},
        {"rate": "inf", "summary": {"output_throughput": 90.0}},
    ]
    assert serving_bench.http_overhead(runs, {"output_throughput": 100.0}) == pytest.approx(0.1)
    assert serving_bench.http_overhead(runs, None) is None
    assert serving_bench.http_overhead(runs[:1], {"output_throughput": 100.0}) is None


def test_bench_config_from_args() -> None:
    parser = serving_bench.build_parser()
    settings, config = serving_bench.configs_from_args(parser.parse_args([]))
    assert config.rates == (1.0, 2.0, 4.0, 8.0, math.inf)
    assert len(config.workload_for(math.inf, 4)) == 32
    assert config.workload_for(1.0, 0) != config.workload_for(2.0, 1)
    assert config.to_dict()["rates"][-1] == "inf"
    _, quick = serving_bench.configs_from_args(parser.parse_args(["--quick"]))
    assert quick.rates == (4.0, math.inf) and quick.output_len == 16


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    fake = FakeServer()
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()


async def test_http_phase_against_a_fake_server(server: FakeServer) -> None:
    parser = serving_bench.build_parser()
    args = parser.parse_args(["--rates", "50,inf", "--num-requests", "3", "--concurrency", "4",
                              "--prompt-len", "8", "--output-len", "5"])  # fmt: skip
    _, config = serving_bench.configs_from_args(args)
    runs = await asyncio.wait_for(serving_bench.http_phase(server.url, config), timeout=30.0)
    assert [run["rate"] for run in runs] == [50.0, "inf"]
    assert [run["summary"]["num_completed"] for run in runs] == [3, 4]
    assert runs[1]["max_concurrency"] == 4
    key = 'molink:generation_tokens_total{model_name="fake-model"}'
    assert [run["server_metrics_delta"][key] for run in runs] == [15.0, 20.0]
