"""The load generator's pure parts: workloads, arrivals, stream parsing, arithmetic."""

from __future__ import annotations

import asyncio
import math
import statistics

import httpx
import pytest

from molink.loadgen import (
    RequestResult,
    RequestSpec,
    WorkloadError,
    arrival_offsets,
    as_text_prompts,
    fixed_workload,
    mixed_workload,
    parse_rate,
    percentile,
    summarize,
)
from molink.loadgen.arrivals import ArrivalError
from molink.loadgen.cli import build_parser, workload_from_args
from molink.loadgen.client import build_body, chunk_content, sse_payload
from molink.loadgen.runner import LoadConfig, fetch_model_name
from molink.loadgen.workload import sample_length


def test_fixed_workload_has_exact_lengths_and_is_seeded() -> None:
    specs = fixed_workload(8, prompt_length=50, output_length=7, seed=3)
    assert len(specs) == 8
    assert all(s.prompt_length == 50 and s.max_tokens == 7 and s.ignore_eos for s in specs)
    assert specs == fixed_workload(8, 50, 7, seed=3)
    assert specs != fixed_workload(8, 50, 7, seed=4)
    assert len({tuple(s.prompt) for s in specs}) == 8  # distinct: no shared prefixes
    assert all(1000 <= t < 10000 for s in specs for t in s.prompt)


@pytest.mark.parametrize("dist", ["uniform", "log-uniform"])
def test_mixed_workload_stays_in_bounds(dist: str) -> None:
    specs = mixed_workload(200, seed=1, prompt_dist=dist)  # type: ignore[arg-type]
    prompt_lengths = [s.prompt_length for s in specs]
    outputs = [s.max_tokens for s in specs]
    assert min(prompt_lengths) >= 32 and max(prompt_lengths) <= 1024
    assert min(outputs) >= 64 and max(outputs) <= 256
    assert specs == mixed_workload(200, seed=1, prompt_dist=dist)  # type: ignore[arg-type]


def test_log_uniform_favours_short_prompts() -> None:
    uniform = [s.prompt_length for s in mixed_workload(600, seed=0, prompt_dist="uniform")]
    log = [s.prompt_length for s in mixed_workload(600, seed=0, prompt_dist="log-uniform")]
    # Uniform over [32, 1024] has median ~528; log-uniform has median ~sqrt(32*1025) ~ 181.
    assert 450 < statistics.median(uniform) < 600
    assert 140 < statistics.median(log) < 230


def test_sample_length_rejects_bad_bounds() -> None:
    import random

    with pytest.raises(WorkloadError):
        sample_length(random.Random(0), (10, 5), "uniform")
    with pytest.raises(WorkloadError):
        sample_length(random.Random(0), (1, 5), "zipf")  # type: ignore[arg-type]
    with pytest.raises(WorkloadError):
        fixed_workload(0, 10, 10)


def test_text_prompts_keep_word_count() -> None:
    specs = as_text_prompts(fixed_workload(2, 40, 5))
    assert all(isinstance(s.prompt, str) and len(s.prompt.split()) == 40 for s in specs)
    assert all(s.max_tokens == 5 for s in specs)


def test_poisson_arrivals_have_the_asked_rate() -> None:
    rate = 4.0
    offsets = arrival_offsets(4001, rate, seed=7)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert offsets[0] == 0.0
    assert all(gap >= 0 for gap in gaps)
    # 4000 exponential gaps: the mean is within ~3% (2 sigma) of 1/rate, and an exponential
    # has its standard deviation equal to its mean.
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.08)
    # Counts per 1 s window are Poisson: variance close to the mean.
    counts = [0] * int(offsets[-1])
    for t in offsets:
        if int(t) < len(counts):
            counts[int(t)] += 1
    assert statistics.mean(counts) == pytest.approx(rate, rel=0.05)
    assert statistics.variance(counts) / statistics.mean(counts) == pytest.approx(1.0, rel=0.2)


def test_arrivals_are_seeded_and_inf_is_all_at_once() -> None:
    assert arrival_offsets(50, 2.0, seed=1) == arrival_offsets(50, 2.0, seed=1)
    assert arrival_offsets(50, 2.0, seed=1) != arrival_offsets(50, 2.0, seed=2)
    assert arrival_offsets(5, math.inf) == [0.0] * 5
    assert parse_rate("inf") == math.inf and parse_rate("2.5") == 2.5
    for bad in ("0", "-1", "fast", "nan"):
        with pytest.raises(ArrivalError):
            parse_rate(bad)


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def _result(ttft: float, itl: float, n_out: int, index: int = 0) -> RequestResult:
    result = RequestResult(index, 0.0, n_out, prompt_length=10, send_time=0.0)
    result.chunk_times = [ttft + i * itl for i in range(n_out)]
    result.ttft = ttft
    result.e2e = result.chunk_times[-1]
    result.output_tokens = n_out
    return result


def test_ttft_tpot_itl_arithmetic() -> None:
    result = _result(ttft=0.5, itl=0.1, n_out=11)
    assert result.succeeded
    assert result.tpot == pytest.approx(0.1)  # (1.5 - 0.5) / 10
    assert result.inter_token_latencies == pytest.approx([0.1] * 10)
    single = _result(ttft=0.5, itl=0.1, n_out=1)
    assert single.tpot is None and single.inter_token_latencies == []


def test_summary_counts_only_successes() -> None:
    ok = [_result(0.2, 0.05, 21, index=i) for i in range(3)]
    failed = RequestResult(3, 0.0, 21, error="HTTP 500: boom")
    summary = summarize([*ok, failed], duration_s=2.0)
    assert (summary.num_requests, summary.num_completed, summary.num_errors) == (4, 3, 1)
    assert summary.total_output_tokens == 63
    assert summary.output_throughput == pytest.approx(31.5)
    assert summary.request_throughput == pytest.approx(1.5)
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    assert summary.tpot_p99_ms == pytest.approx(50.0)
    assert summary.itl_p99_ms == pytest.approx(50.0)
    assert summary.e2e_p50_ms == pytest.approx(1200.0)
    assert summary.total_prompt_tokens == 30
    assert summary.error_samples == ["HTTP 500: boom"]
    assert summary.to_dict()["num_errors"] == 1


def test_summary_of_nothing_is_json_safe() -> None:
    summary = summarize([RequestResult(0, 0.0, 5, error="x")], duration_s=0.0)
    assert summary.ttft_p50_ms is None and summary.output_throughput == 0.0


def test_stream_parsing_helpers() -> None:
    assert sse_payload('data: {"a": 1}') == '{"a": 1}'
    assert sse_payload("data:[DONE]") == "[DONE]"
    assert sse_payload("") is None and sse_payload(": keep-alive") is None
    assert chunk_content({"choices": [{"text": "hi"}]}) == "hi"
    assert chunk_content({"choices": [{"delta": {"content": "yo"}}]}) == "yo"
    assert chunk_content({"choices": [{"delta": {"role": "assistant"}}]}) == ""
    assert chunk_content({"choices": [], "usage": {"completion_tokens": 3}}) == ""


def test_request_bodies() -> None:
    spec = RequestSpec([1, 2, 3], 9)
    body = build_body(spec, "m", "completions", extra_body={"top_k": 5})
    assert body["prompt"] == [1, 2, 3] and body["max_tokens"] == 9
    assert body["ignore_eos"] is True and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True} and body["top_k"] == 5
    chat = build_body(RequestSpec("hello", 4), "m", "chat")
    assert chat["messages"] == [{"role": "user", "content": "hello"}]
    with pytest.raises(WorkloadError):
        build_body(spec, "m", "chat")


def test_load_config_validates_and_hides_the_key() -> None:
    with pytest.raises(ArrivalError):
        LoadConfig("http://127.0.0.1:1", rate=0.0)
    with pytest.raises(ValueError):
        LoadConfig("http://127.0.0.1:1", max_concurrency=0)
    document = LoadConfig("http://127.0.0.1:1", api_key="secret").to_dict()
    assert "api_key" not in document and document["rate"] == "inf"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("read_timeout_s", 0.0),
        ("read_timeout_s", -1.0),
        ("read_timeout_s", math.nan),
        ("read_timeout_s", math.inf),
        ("run_timeout_s", 0.0),
        ("run_timeout_s", -5.0),
        ("run_timeout_s", math.nan),
    ],
)
def test_load_config_refuses_timeouts_that_end_a_run_before_it_starts(
    field: str, value: float
) -> None:
    """A run timeout of 0 or below cancelled every request and reported them all as
    failures of the server; NaN never timed out. Refused, naming the field."""
    with pytest.raises(ValueError, match=field):
        LoadConfig("http://127.0.0.1:1", **{field: value})
    assert LoadConfig("http://127.0.0.1:1", run_timeout_s=None).run_timeout_s is None


@pytest.mark.parametrize(
    "answer",
    [b'{"data": [{"name": "m"}]}', b'{"data": "m"}', b"[1]", b"not json", b'{"data": [3]}'],
)
def test_a_model_list_of_the_wrong_shape_is_a_clear_error(answer: bytes) -> None:
    """The CLI reports a RuntimeError as "cannot start the run"; a KeyError or a
    JSONDecodeError left it with a traceback."""

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=answer)

    async def fetch() -> str:
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            return await fetch_model_name(client)

    with pytest.raises(RuntimeError, match="/v1/models"):
        asyncio.run(fetch())


def test_cli_parses_the_documented_command() -> None:
    args = build_parser().parse_args(
        "--url http://127.0.0.1:8000 --model NAME --workload mixed --num-requests 64 "
        "--rate 4 --seed 0 --out results.json".split()
    )
    assert args.rate == 4.0 and args.model == "NAME"
    specs = workload_from_args(args)
    assert len(specs) == 64 and specs == mixed_workload(64, seed=0)
