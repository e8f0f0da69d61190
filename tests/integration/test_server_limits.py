"""Values that fit HTTP but not the wire or the engine are refused by name while other
streams run on, and the vLLM metric names are served, parseable, and move under load."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MODEL, LiveServer

pytestmark = pytest.mark.integration

BAD_VALUES = [
    ({"stop_token_ids": [2**40]}, "stop_token_ids"),
    ({"seed": 2**70}, "seed"),
    ({"top_k": 2**40}, "top_k"),
    ({"min_tokens": 2**40}, "min_tokens"),
    ({"stop": [f"stop{i}" for i in range(65)]}, "stop"),
    ({"temperature": 2.5}, "temperature"),
]
VLLM_NAMES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:prompt_tokens",
    "vllm:generation_tokens",
    "vllm:request_success",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:num_preemptions",
)


def families(server: LiveServer) -> dict[str, float]:
    """Sample name -> value summed over labels, read with prometheus_client's own parser."""
    text = server.http.get("/metrics").text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


async def _stream(client, seed: int) -> str:
    stream = await client.completions.create(
        model=MODEL, prompt=f"Story {seed}:", max_tokens=24, temperature=1.0, seed=seed,
        stream=True,
    )  # fmt: skip
    return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])


async def test_bad_values_get_400_while_four_streams_run(live_server: LiveServer) -> None:
    client = live_server.async_client()
    alone = [await _stream(client, seed) for seed in range(4)]
    before = families(live_server)
    streams = [asyncio.ensure_future(_stream(client, seed)) for seed in range(4)]
    await asyncio.sleep(0.5)
    for body, param in BAD_VALUES:
        response = await asyncio.to_thread(
            live_server.http.post,
            "/v1/completions",
            json={"model": MODEL, "prompt": "x", "max_tokens": 4, **body},
        )
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param
    assert await asyncio.gather(*streams) == alone  # seeded: the same text, unaffected
    await client.close()
    after = families(live_server)
    for name in VLLM_NAMES:
        assert any(key.startswith(name) for key in after), name
    assert after["vllm:generation_tokens_total"] >= before["vllm:generation_tokens_total"] + 96
    assert (
        after["vllm:time_to_first_token_seconds_count"]
        >= before["vllm:time_to_first_token_seconds_count"] + 4
    )
    assert (
        after["vllm:inter_token_latency_seconds_count"]
        > before["vllm:inter_token_latency_seconds_count"]
    )
