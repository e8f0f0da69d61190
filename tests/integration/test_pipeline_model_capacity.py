"""The head admits only what the smallest stage can hold, and every stage lets go.

A middle stage with a small ``--kv-cache-memory`` owns few blocks; more work than fits at
once still comes out exact (the head admits within the room the stage advertises, and a
step the stage has no room for is refused with a typed reason and preempted, never
failed); and once requests finish, or a client leaves mid-stream, no node holds a
sequence and every block is free again.
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable

import httpx
import pytest
import torch

from molink.engine.offline import LLM
from molink.models.kv_cache import KVCache
from molink.pipeline.wire import node_from_proto
from molink.weights import resolve_model_source
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    Case,
    assert_same_completions,
    complete_all,
    held_sequences,
    reference_completions,
    running_pipeline,
    served_model_name,
    stage_health,
    stage_info,
    wait_pipeline_idle,
)

pytestmark = pytest.mark.integration

SMALL_KV = "256KiB"
SMALL_KV_BYTES = 256 * 1024
BOUNDS = (0, 1, 3, 4)  # the small stage is the middle one, [1, 3)
NUM_REQUESTS = 12
MAX_TOKENS = 96
TOKENS_BEFORE_LEAVING = 3


def _cases(token_ids: list[int]) -> list[Case]:
    """Far more tokens than the small stage holds at once (about 6x)."""
    return [
        Case(
            prompt=(token_ids * 2)[index : index + 30 + index],
            max_tokens=MAX_TOKENS - index,
            stream=index % 2 == 0,
            seed=None if index % 3 else 77 + index,
            ignore_eos=True,
        )
        for index in range(NUM_REQUESTS)
    ]


def _small_stage_blocks(model: str) -> int:
    config = resolve_model_source(model).model_config
    per_block = KVCache.bytes_per_block(config, BOUNDS[2] - BOUNDS[1], 16, torch.float32)
    return SMALL_KV_BYTES // per_block


async def _leave_mid_stream(
    base_url: str, prompt: list[int], before_leaving: Callable[[], None]
) -> int:
    """Stream a long completion, call ``before_leaving`` after a few tokens, then hang up.
    Returns the tokens seen."""
    body = {
        "model": served_model_name(base_url),
        "prompt": prompt,
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    seen = 0
    async with httpx.AsyncClient(base_url=base_url, timeout=60.0) as http:
        async with http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    assert "error" not in json.loads(line[6:]), line
                    seen += 1
                if seen >= TOKENS_BEFORE_LEAVING:
                    before_leaving()
                    break  # leaving the block closes the connection
    return seen


async def test_head_admits_within_smallest_stage_and_stages_release(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3"))
    llm = LLM(model=model)
    cases = _cases(llm.tokenizer.encode(PASSAGE))
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    small = _small_stage_blocks(model)
    needed = sum(-(-(len(c.prompt) + c.max_tokens) // 16) for c in cases)
    assert needed > 3 * small  # the workload cannot run all at once

    stage_args = {1: ["--kv-cache-memory", SMALL_KV]}
    with running_pipeline(BOUNDS, model, stage_args=stage_args) as pipeline:
        blocks = [node_from_proto(stage_info(n)).num_kv_blocks for n in pipeline.nodes]
        assert blocks[1] == small and small < min(blocks[0], blocks[2]), blocks
        assert stage_health(pipeline.nodes[1]).total_kv_blocks == small

        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        wait_pipeline_idle(pipeline)
        for node in pipeline.nodes[1:]:
            health = stage_health(node)
            assert health.free_kv_blocks == health.total_kv_blocks, health

        # A client that hangs up mid-stream: its sequence is released on every stage.
        held: dict[str, int] = {}
        leave = _leave_mid_stream(
            pipeline.base_url, cases[0].prompt, lambda: held.update(held_sequences(pipeline))
        )
        assert await asyncio.wait_for(leave, 120) == TOKENS_BEFORE_LEAVING
        assert held and all(count == 1 for count in held.values()), held
        wait_pipeline_idle(pipeline)
