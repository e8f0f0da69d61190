"""A pipeline of ``molink serve`` processes when a stage dies or a wrong node tries to join.

* A stage killed with SIGKILL mid-generation, with no replica: every request in flight
  fails within the failover timeout (plus a bound), with an error that names the stage; the head keeps answering /health (503 naming the
  missing layers); a replacement serving the same layers restores service.
* A node whose model differs is refused: it exits non-zero with the reason in its log,
  and the head logs the refusal too. (Overlapping spans are replicas, and welcome.)
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.integration.conftest import is_idle
from tests.integration.pipeline_fixtures import (
    Case,
    Node,
    Pipeline,
    assert_same_completions,
    complete_all,
    head_health,
    head_metrics,
    running_pipeline,
    served_model_name,
    wait_answering,
    wait_pipeline_idle,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration

# Long enough that no request can finish before the kill, on any machine.
LONG_CONTEXT = 4096
LONG_MAX_TOKENS = 4000
NUM_STREAMED = 6
NUM_UNSTREAMED = 2
TOKENS_BEFORE_KILL = 3
FAILOVER_TIMEOUT_S = 4.0  # how long the requests wait for another node to serve [2, 4)
FAILURE_BOUND_S = 20.0 + FAILOVER_TIMEOUT_S
STAYS_READY_S = 6.0  # the head checks every stage's health each second
REFUSED_EXIT_TIMEOUT_S = 120.0
PROBE = Case(prompt=[5, 6, 7, 8, 9, 10, 11], max_tokens=12, stream=False)


@dataclass
class Outcome:
    """How one request ended after the kill."""

    status: int
    error: str | None  # the error message the client got, if any
    num_tokens: int  # chunks with text before the end
    ended_at: float


def _sse_events(line: str) -> dict | None:
    if not line.startswith("data: ") or line == "data: [DONE]":
        return None
    return json.loads(line[len("data: ") :])


async def _stream(
    http: httpx.AsyncClient, model: str, prompt: list[int], started: asyncio.Event
) -> Outcome:
    """One long streamed completion; sets ``started`` once a few tokens came back."""
    body = _long_body(model, prompt, stream=True)
    num_tokens, error = 0, None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            event = _sse_events(line)
            if event is None:
                continue
            if "error" in event:
                error = event["error"]["message"]
                continue
            num_tokens += 1
            if num_tokens >= TOKENS_BEFORE_KILL:
                started.set()
    return Outcome(response.status_code, error, num_tokens, time.monotonic())


async def _unstreamed(http: httpx.AsyncClient, model: str, prompt: list[int]) -> Outcome:
    response = await http.post("/v1/completions", json=_long_body(model, prompt, stream=False))
    error = response.json().get("error", {}).get("message") if response.is_error else None
    return Outcome(response.status_code, error, 0, time.monotonic())


def _long_body(model: str, prompt: list[int], stream: bool) -> dict:
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": LONG_MAX_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _kill_while_streaming(pipeline: Pipeline, victim: Node) -> tuple[list[Outcome], float]:
    """Start long requests, kill ``victim`` once every stream has tokens; how they ended."""
    model = served_model_name(pipeline.base_url)
    timeout = httpx.Timeout(10.0, read=FAILURE_BOUND_S * 3)
    async with httpx.AsyncClient(base_url=pipeline.base_url, timeout=timeout) as http:
        events = [asyncio.Event() for _ in range(NUM_STREAMED)]
        tasks = [
            asyncio.create_task(_stream(http, model, [20 + i, 30, 40 + i], event))
            for i, event in enumerate(events)
        ]
        tasks += [
            asyncio.create_task(_unstreamed(http, model, [50 + i, 60, 70]))
            for i in range(NUM_UNSTREAMED)
        ]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=120)
        killed_at = time.monotonic()
        victim.kill()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), timeout=FAILURE_BOUND_S * 3)
    return outcomes, killed_at


def _assert_failed_clearly(outcomes: list[Outcome], killed_at: float, victim: Node) -> None:
    for index, outcome in enumerate(outcomes):
        where = f"request {index}: {outcome}"
        assert outcome.ended_at - killed_at < FAILURE_BOUND_S, where
        assert outcome.error is not None, where
        assert victim.grpc_address in outcome.error, where
        assert "stage" in outcome.error, where
        if index < NUM_STREAMED:
            assert outcome.status == 200, where  # the stream had started: an error event
            assert outcome.num_tokens >= TOKENS_BEFORE_KILL, where
            assert outcome.num_tokens < LONG_MAX_TOKENS, where
        else:
            assert 500 <= outcome.status < 600, where


async def test_killed_stage_fails_requests_then_a_replacement_serves(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3", max_position_embeddings=LONG_CONTEXT))
    args = ("--molink-failover-timeout", str(FAILOVER_TIMEOUT_S))
    with running_pipeline((0, 2, 4), model, extra_args=args) as pipeline:
        victim = pipeline.nodes[1]
        before = await complete_all(pipeline.base_url, [PROBE])

        outcomes, killed_at = await _kill_while_streaming(pipeline, victim)
        _assert_failed_clearly(outcomes, killed_at, victim)

        # The head stays up and says which layers are missing, and who served them.
        status, message = head_health(pipeline.base_url)
        wait_until(
            lambda: "layers [2, 4) are not served" in head_health(pipeline.base_url)[1],
            FAILURE_BOUND_S,
            lambda: f"/health names the missing layers (now {head_health(pipeline.base_url)})",
        )
        status, message = head_health(pipeline.base_url)
        assert status == 503 and victim.grpc_address in message, message
        wait_until(
            lambda: is_idle(head_metrics(pipeline.base_url)), FAILURE_BOUND_S, "blocks are free"
        )

        # A replacement with the same layers (and address) joins; the head serves again.
        replacement = pipeline.start_stage(2, -1, grpc_port=victim.grpc_port)
        wait_answering(replacement)
        wait_ready(pipeline.base_url)
        after = await complete_all(pipeline.base_url, [PROBE])
        assert_same_completions(after, before, [PROBE])
        # Several health checks later the replacement is still part of the pipeline.
        _assert_stays_ready(pipeline, STAYS_READY_S)
        wait_pipeline_idle(pipeline)


def _assert_stays_ready(pipeline: Pipeline, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, message = head_health(pipeline.base_url)
        assert status == 200, message
        time.sleep(0.2)


# -- refused joins ------------------------------------------------------------------------


def _assert_refused(pipeline: Pipeline, joiner: Node, reason: str) -> None:
    """The joiner exits non-zero with ``reason`` (a regex) in its log; the head logs it."""
    status = joiner.wait_exit(REFUSED_EXIT_TIMEOUT_S)
    log = joiner.log_text()
    assert status != 0, log[-3000:]
    assert re.search(r"join refused by .*" + reason, log), log[-3000:]
    head_log = pipeline.head.log_text()
    assert re.search(r"refused node .*" + reason, head_log), head_log[-3000:]
    assert head_health(pipeline.base_url)[0] == 200  # the pipeline is untouched


def test_a_different_model_join_is_refused(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3"))
    with running_pipeline((0, 2, 4), model) as pipeline:
        # Another model, with six layers instead of four.
        other = str(tiny_model_dir("qwen3", num_hidden_layers=6))
        stranger = pipeline.start_stage(4, -1, model=other)
        _assert_refused(pipeline, stranger, "layer count mismatch: .* 6-layer model")
