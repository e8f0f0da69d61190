"""Many concurrent streams and clients that leave early, against the real server: every
request gets exact usage, and afterwards every KV block is free again."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.integration.conftest import (
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    Streamed,
    assert_idle,
    collect_chat_stream,
)

pytestmark = pytest.mark.integration

NUM_CONCURRENT = 64
CONCURRENT_MAX_TOKENS = 6
# Tokens a request that is left running would still generate: far more than a test waits for.
LONG_MAX_TOKENS = MAX_MODEL_LEN - 64
TOKENS_BEFORE_LEAVING = 4


def _messages(index: int) -> list[dict[str, Any]]:
    # Prompts of different lengths, so that sequences are at different positions.
    return [{"role": "user", "content": f"Count from 1 to {index}. " + "Please. " * (index % 5)}]


async def test_64_concurrent_streams_with_exact_usage(
    live_server: LiveServer, async_client: openai.AsyncOpenAI
) -> None:
    async def one(index: int) -> Streamed:
        stream = await async_client.chat.completions.create(
            model=MODEL,
            messages=_messages(index),
            temperature=0.8,
            max_tokens=CONCURRENT_MAX_TOKENS,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
        return collect_chat_stream([chunk async for chunk in stream])

    results = await asyncio.wait_for(
        asyncio.gather(*(one(i) for i in range(NUM_CONCURRENT))), timeout=600
    )
    for index, streamed in enumerate(results):
        (choice,) = streamed.choices.values()
        assert choice.finish_reason in ("stop", "length"), (index, choice)
        assert 1 <= choice.num_tokens <= CONCURRENT_MAX_TOKENS
        assert streamed.num_usage_chunks == 1
        assert streamed.usage.completion_tokens == choice.num_tokens, index
        prompt_tokens = live_server.count_chat_tokens(_messages(index))
        assert streamed.usage.prompt_tokens == prompt_tokens, index
    assert_idle(live_server, timeout=15)


def _long_request(stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
        "temperature": 0,
        "max_tokens": LONG_MAX_TOKENS,
        "ignore_eos": True,
        "stream": stream,
    }


def _assert_aborted(live_server: LiveServer, seconds_per_token: float) -> None:
    """All blocks free long before the request could have run to its end."""
    left_at = time.monotonic()
    assert_idle(live_server, timeout=30)
    waited = time.monotonic() - left_at
    remaining = (LONG_MAX_TOKENS - TOKENS_BEFORE_LEAVING) * seconds_per_token
    assert waited < remaining / 4, (waited, remaining)


def test_client_leaving_mid_stream_aborts_its_request(live_server: LiveServer) -> None:
    assert_idle(live_server)
    with httpx.Client(base_url=live_server.base_url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json=_long_request(True)) as response:
            assert response.status_code == 200
            num_tokens, started = 0, time.monotonic()
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[len("data: ") :])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    num_tokens += 1
                if num_tokens == TOKENS_BEFORE_LEAVING:
                    break
            seconds_per_token = (time.monotonic() - started) / num_tokens
            in_use = live_server.metrics()
            assert in_use["molink:num_requests_running"] == 1
            assert in_use["molink:num_free_kv_blocks"] < in_use["molink:num_total_kv_blocks"]
        # Leaving the block closes the connection mid-stream.
    _assert_aborted(live_server, seconds_per_token)


def test_client_leaving_a_non_streamed_request_aborts_it(live_server: LiveServer) -> None:
    assert_idle(live_server)
    # Measure the decode speed first, so that "long before the end" means something here.
    started = time.monotonic()
    warmup = {**_long_request(False), "max_tokens": TOKENS_BEFORE_LEAVING}
    live_server.http.post("/v1/chat/completions", json=warmup).raise_for_status()
    seconds_per_token = (time.monotonic() - started) / TOKENS_BEFORE_LEAVING
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{live_server.base_url}/v1/chat/completions",
            json=_long_request(False),
            timeout=httpx.Timeout(10.0, read=max(1.0, 3 * seconds_per_token)),
        )
    _assert_aborted(live_server, seconds_per_token)
