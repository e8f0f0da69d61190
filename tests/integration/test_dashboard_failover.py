"""The dashboard through a real failover (``molink serve`` processes, a tiny model): a head
and two replicas of the tail span; the replica holding the most streams is killed midway.
Every request then names the surviving replica as the route that served it (the route at
its start no longer), the failover and replay counters and their chart have data, and the
killed replica shows dead while every layer stays covered."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.integration.pipeline_fixtures import (
    head_metrics,
    running_pipeline,
    stage_health,
    wait_answering,
    wait_until,
)

pytestmark = pytest.mark.integration

NUM_STREAMS = 6
MAX_TOKENS = 160
TOKENS_BEFORE_KILL = 4  # every stream has this many before the victim goes
WAIT_S = 240.0
ARGS = ("--molink-failover-timeout", "60")


async def _stream(client: httpx.AsyncClient, base_url: str, index: int) -> tuple[str, str]:
    """One streamed completion; returns (its response id, its finish reason)."""
    body = {"prompt": [5 + index, 6, 7], "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    response_id, finish = "", ""
    async with client.stream("POST", f"{base_url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            response_id = chunk["id"]
            finish = chunk["choices"][0]["finish_reason"] or finish
    return response_id, finish


def _snapshot(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/dashboard/api/snapshot", timeout=10.0)
    response.raise_for_status()
    return response.json()


async def test_after_a_failover_the_dashboard_and_routes_show_it(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama", max_position_embeddings=512))
    with running_pipeline((0, 2, 4), model, extra_args=ARGS) as pipeline:
        replica = pipeline.start_stage(2, -1, extra_args=ARGS)
        wait_answering(replica)
        replicas = [pipeline.nodes[1], replica]
        base = pipeline.base_url

        def listed() -> bool:  # the dashboard keeps showing a node only once it saw it
            shown = {node["node_id"] for node in _snapshot(base)["snapshot"]["nodes"]}
            return {node.grpc_address for node in replicas} <= shown

        wait_until(listed, 30, "the dashboard lists both replicas")
        async with httpx.AsyncClient(timeout=WAIT_S) as client:
            streams = asyncio.gather(*(_stream(client, base, i) for i in range(NUM_STREAMS)))
            task = asyncio.ensure_future(streams)
            deadline = time.monotonic() + WAIT_S
            sampled = "molink:pipeline_sampled_tokens_total"
            while head_metrics(base).get(sampled, 0.0) < NUM_STREAMS * TOKENS_BEFORE_KILL:
                assert not task.done() and time.monotonic() < deadline, "no tokens came"
                await asyncio.sleep(0.05)
            held = {n.grpc_address: stage_health(n).active_sequences for n in replicas}
            victim = max(replicas, key=lambda node: held[node.grpc_address])
            assert held[victim.grpc_address] > 0, held
            victim.kill()
            results = await task
        survivor = next(node for node in replicas if node is not victim)
        served = pipeline.head.grpc_address, survivor.grpc_address
        for response_id, finish in results:
            assert finish == "length"
            route = httpx.get(f"{base}/dashboard/api/served/{response_id}", timeout=10).json()
            assert tuple(route["route"]) == served, (route, held)

        def counted() -> bool:
            body = _snapshot(base)
            points = body["history"]
            return (
                body["snapshot"]["failovers_total"] >= 1
                and body["snapshot"]["replays_total"] >= 1
                and any(p["failovers_total"] >= 1 and p["replays_total"] >= 1 for p in points)
            )

        wait_until(counted, 30, "the failover and replays reach the snapshot and the chart")
        snapshot = _snapshot(base)["snapshot"]
        nodes = {node["node_id"]: node for node in snapshot["nodes"]}
        assert nodes[victim.grpc_address]["health"] in ("missing", "dead")
        assert snapshot["missing_spans"] == []  # the survivor serves the span
