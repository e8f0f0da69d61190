"""The load generator against a fake OpenAI-compatible SSE server on loopback.

The fake streams ``max_tokens`` tokens, with its timing and failure modes chosen per
request through extra body fields (``fake_*``), so each test states what it expects.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from molink.loadgen import LoadConfig, RequestSpec, fixed_workload, run_load
from molink.loadgen.cli import main as loadgen_main
from tests.helpers.server_process import free_port

LOOPBACK = "127.0.0.1"
MODEL = "fake-model"


class FakeState:
    """What the fake server saw, for assertions about concurrency. Counted per ``fake_tag``,
    because streams cancelled by an earlier test may still be winding down."""

    def __init__(self) -> None:
        self.in_flight: dict[str, int] = {}
        self.max_in_flight: dict[str, int] = {}
        self.generation_tokens = 0

    def enter(self, tag: str) -> None:
        self.in_flight[tag] = self.in_flight.get(tag, 0) + 1
        self.max_in_flight[tag] = max(self.max_in_flight.get(tag, 0), self.in_flight[tag])

    def leave(self, tag: str) -> None:
        self.in_flight[tag] -= 1


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


# Valid JSON that is not a chunk as the API shapes one (a proxy's or a broken server's).
_MALFORMED: dict[str, Any] = {
    "not_object": "[1, 2]",
    "choices_not_list": {"choices": {"text": "x"}},
    "usage_not_count": {"choices": [], "usage": {"completion_tokens": "many"}},
}


def _token_chunk(chat: bool, text: str) -> dict[str, Any]:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {"object": "chunk", "model": MODEL, "choices": [choice]}


async def _stream(body: dict[str, Any], chat: bool, state: FakeState) -> AsyncIterator[str]:
    """Streams as vLLM does: (role chunk), token chunks, usage chunk, [DONE]."""
    tag = str(body.get("fake_tag", ""))
    state.enter(tag)
    try:
        mode = body.get("fake_mode", "ok")
        max_tokens = int(body["max_tokens"])
        per_chunk = int(body.get("fake_tokens_per_chunk", 1))
        if chat:
            yield _sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        await asyncio.sleep(float(body.get("fake_ttft", 0.0)))
        for sent in range(0, max_tokens, per_chunk):
            if sent > 0:
                await asyncio.sleep(float(body.get("fake_itl", 0.0)) * per_chunk)
            if mode == "stall" and sent >= max_tokens // 2:
                await asyncio.sleep(5.0)
            if mode == "stream_error" and sent >= max_tokens // 2:
                yield _sse({"error": {"message": "engine died", "code": 500}})
                return
            if mode in _MALFORMED and sent >= max_tokens // 2:
                yield _sse(_MALFORMED[mode])
            num_tokens = min(per_chunk, max_tokens - sent)
            state.generation_tokens += num_tokens
            yield _sse(_token_chunk(chat, "tok " * num_tokens))
        if mode == "no_done":
            return
        if mode != "no_usage":
            prompt = body.get("prompt")
            usage = {
                "prompt_tokens": len(prompt) if isinstance(prompt, list) else 1,
                "completion_tokens": max_tokens,
            }
            yield _sse({"choices": [], "usage": usage})
        yield _sse("[DONE]")
    finally:
        state.leave(tag)


def make_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        name = "molink:generation_tokens_total"
        return PlainTextResponse(
            f'# TYPE {name} counter\n{name}{{model_name="{MODEL}"}} {state.generation_tokens}\n'
        )

    async def generate(request: Request, chat: bool) -> Any:
        body = await request.json()
        if body.get("prompt") == "fail" or body.get("fake_mode") == "http_error":
            return JSONResponse({"error": {"message": "bad request"}}, status_code=500)
        return StreamingResponse(_stream(body, chat, state), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await generate(request, chat=True)

    return app


class FakeServer:
    def __init__(self) -> None:
        self.state = FakeState()
        self.port = free_port()
        config = uvicorn.Config(
            make_app(self.state),
            host=LOOPBACK,
            port=self.port,
            log_level="warning",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 20.0
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10.0)


@pytest.fixture(scope="module")
def server() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(server: FakeServer, **overrides: Any) -> LoadConfig:
    values: dict[str, Any] = {"base_url": server.url, "read_timeout_s": 10.0, "run_timeout_s": 30.0}
    return LoadConfig(**{**values, **overrides})


async def _run(specs: list[RequestSpec], config: LoadConfig, bound_s: float = 30.0) -> Any:
    return await asyncio.wait_for(run_load(specs, config), timeout=bound_s)


async def test_ttft_and_tpot_follow_the_server_timing(server: FakeServer) -> None:
    ttft, itl, n_out = 0.2, 0.02, 11
    specs = fixed_workload(4, prompt_length=16, output_length=n_out)
    run = await _run(specs, _config(server, extra_body={"fake_ttft": ttft, "fake_itl": itl}))
    assert run.model == MODEL  # found at /v1/models
    assert run.summary.num_errors == 0 and run.summary.num_completed == 4
    for result in run.results:
        assert result.usage_reported and result.output_tokens == n_out
        assert result.prompt_tokens == 16
        assert len(result.chunk_times) == n_out
        assert ttft <= result.ttft < ttft + 1.0
        # The fake sleeps at least itl between tokens; a busy host adds, never removes.
        assert itl * 0.9 <= result.tpot < itl + 0.2
        assert result.e2e >= result.ttft + (n_out - 1) * itl * 0.9
        assert result.tpot == pytest.approx((result.e2e - result.ttft) / (n_out - 1))
    assert run.summary.total_output_tokens == 4 * n_out
    assert run.summary.output_throughput == pytest.approx(4 * n_out / run.duration_s)
    assert run.summary.num_length_mismatches == 0


async def test_usage_counts_tokens_when_chunks_carry_several(server: FakeServer) -> None:
    specs = fixed_workload(2, prompt_length=4, output_length=10)
    run = await _run(specs, _config(server, extra_body={"fake_tokens_per_chunk": 3}))
    for result in run.results:
        assert result.output_tokens == 10  # from usage, not the 4 chunks
        assert len(result.chunk_times) == 4
        assert len(result.inter_token_latencies) == 3


async def test_without_usage_chunks_are_counted(server: FakeServer) -> None:
    specs = fixed_workload(2, prompt_length=4, output_length=6)
    run = await _run(specs, _config(server, extra_body={"fake_mode": "no_usage"}))
    assert run.summary.num_errors == 0
    assert all(not r.usage_reported and r.output_tokens == 6 for r in run.results)


async def test_chat_route_skips_the_role_chunk(server: FakeServer) -> None:
    specs = [RequestSpec("hello there", 5)]
    run = await _run(specs, _config(server, endpoint="chat", extra_body={"fake_ttft": 0.1}))
    (result,) = run.results
    assert result.error is None and result.output_tokens == 5
    assert len(result.chunk_times) == 5 and result.ttft >= 0.1


async def test_errors_are_counted_not_raised(server: FakeServer) -> None:
    specs = [*fixed_workload(3, 4, 4), RequestSpec("fail", 4), RequestSpec("fail", 4)]
    run = await _run(specs, _config(server))
    assert (run.summary.num_completed, run.summary.num_errors) == (3, 2)
    failed = [r for r in run.results if r.error]
    assert all(r.status_code == 500 and r.error.startswith("HTTP 500") for r in failed)
    assert run.summary.total_output_tokens == 12


@pytest.mark.parametrize(
    ("mode", "message"),
    [("stream_error", "engine died"), ("no_done", "before [DONE]")],
)
async def test_broken_streams_are_errors(server: FakeServer, mode: str, message: str) -> None:
    run = await _run(fixed_workload(2, 4, 6), _config(server, extra_body={"fake_mode": mode}))
    assert run.summary.num_errors == 2
    assert all(message in r.error for r in run.results)


@pytest.mark.parametrize("mode", list(_MALFORMED))
async def test_a_chunk_of_the_wrong_shape_is_that_requests_error(
    server: FakeServer, mode: str
) -> None:
    """Counted with its message, not raised out of the request's task (which left the
    request failed with no error to show, and its exception unretrieved)."""
    run = await _run(fixed_workload(2, 4, 6), _config(server, extra_body={"fake_mode": mode}))
    assert run.summary.num_errors == 2
    assert all(r.error is not None and "malformed" in r.error for r in run.results)
    assert run.summary.error_samples and "malformed" in run.summary.error_samples[0]


async def test_connection_refused_is_an_error() -> None:
    config = LoadConfig(f"http://{LOOPBACK}:{free_port()}", model="m", run_timeout_s=10.0)
    run = await _run(fixed_workload(3, 4, 4), config)
    assert run.summary.num_errors == 3 and "ConnectError" in run.results[0].error


async def test_read_timeout_ends_a_stalled_request(server: FakeServer) -> None:
    config = _config(server, read_timeout_s=0.3, extra_body={"fake_mode": "stall"})
    started = time.monotonic()
    run = await _run(fixed_workload(2, 4, 6), config)
    assert time.monotonic() - started < 4.0
    assert all("ReadTimeout" in r.error for r in run.results)


async def test_run_timeout_cancels_what_is_left(server: FakeServer) -> None:
    specs = fixed_workload(3, 4, 50)
    config = _config(server, run_timeout_s=0.5, extra_body={"fake_itl": 0.05})
    started = time.monotonic()
    run = await _run(specs, config, bound_s=10.0)
    assert time.monotonic() - started < 3.0
    assert run.summary.num_errors == 3
    assert all("run timeout" in r.error for r in run.results)


async def test_concurrency_cap_holds(server: FakeServer) -> None:
    specs = fixed_workload(10, 4, 5)
    extra = {"fake_itl": 0.02, "fake_tag": "cap"}
    run = await _run(specs, _config(server, max_concurrency=3, extra_body=extra))
    assert run.summary.num_errors == 0
    assert server.state.max_in_flight["cap"] == 3


async def test_poisson_sends_follow_the_schedule(server: FakeServer) -> None:
    rate, num = 20.0, 20
    run = await _run(fixed_workload(num, 4, 2), _config(server, rate=rate, seed=5))
    offsets = [r.scheduled_time for r in run.results]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    lateness = sorted(r.send_time - r.scheduled_time for r in run.results)
    # Never early. Late only by event-loop delay, which a busy host can stretch for a moment
    # (a stall delays every send due in it), so the bound is on the typical send, not each.
    assert lateness[0] >= -0.005
    assert lateness[len(lateness) // 2] < 0.25
    assert run.duration_s >= offsets[-1]


def test_cli_writes_results(server: FakeServer, tmp_path: Any) -> None:
    out = tmp_path / "results.json"
    argv = f"--url {server.url} --workload fixed --num-requests 4 --prompt-len 8 "
    argv += f"--output-len 3 --rate 50 --seed 0 --run-timeout 30 --out {out}"
    assert loadgen_main(argv.split()) == 0
    document = json.loads(out.read_text())
    assert document["workload"] == "fixed"
    assert document["config"]["model"] == MODEL and document["config"]["rate"] == 50.0
    assert document["summary"]["num_completed"] == 4
    assert len(document["requests"]) == 4
    assert document["requests"][0]["output_tokens"] == 3


def test_cli_reports_an_unreachable_server() -> None:
    url = f"http://{LOOPBACK}:{free_port()}"
    assert loadgen_main(["--url", url, "--num-requests", "1", "--run-timeout", "10"]) == 2
