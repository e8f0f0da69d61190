"""Several heads sharing one tail node, found through the DHT (``molink serve`` processes).

Head A and the tail form a pipeline; head B starts with ``--molink-initial-peer`` pointing
at A, bootstraps the DHT from it and finds the tail's signed, sealed record there (every
node holds one swarm key). 16 concurrent requests on each head at once give exactly what one
process gives, and afterwards the tail holds no sequence and every one of its KV blocks is
free.
"""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys

import pytest

from molink.engine.offline import LLM
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.transport.config import TransportConfig
from tests.helpers.server_process import REPO_ROOT
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    assert_same_completions,
    complete_all,
    mixed_cases,
    reference_completions,
    running_pipeline,
    stage_health,
    wait_answering,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration

KEY = generate_swarm_key()
# With a swarm key: DHT records are signed and sealed, and every channel is mutual TLS.
DHT = ("--molink-dht", "on", "--molink-dht-ttl", "6", "--molink-swarm-key", KEY.text())
MEMBER = TransportConfig(security=SwarmCredentials.from_key(KEY))
NUM_REQUESTS = 16
MAX_TOKENS = (5, 17, 1, 9)


async def test_two_heads_share_one_tail_found_through_the_dht(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3"))
    llm = LLM(model=model)
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), NUM_REQUESTS, MAX_TOKENS)
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    with running_pipeline((0, 2, 4), model, extra_args=DHT) as pipeline:
        head_b = pipeline.start_stage(0, 2, extra_args=DHT)
        wait_answering(head_b)
        wait_ready(head_b.base_url)
        got_a, got_b = await asyncio.gather(
            complete_all(pipeline.base_url, cases), complete_all(head_b.base_url, cases)
        )
        assert_same_completions(got_a, expected, cases)
        assert_same_completions(got_b, expected, cases)
        tail = pipeline.nodes[1]

        def tail_is_empty() -> bool:
            health = stage_health(tail, MEMBER)
            return health.free_kv_blocks == health.total_kv_blocks and not health.heads

        wait_until(
            tail_is_empty, 60, lambda: f"the tail frees everything: {stage_health(tail, MEMBER)}"
        )
        _check_status_reads_the_dht(tail.grpc_address, pipeline.head.grpc_address)


def _check_status_reads_the_dht(tail: str, head_a: str) -> None:
    """``molink status`` (a member: it has the key) lists the three records, with both heads
    as replicas of [0, 2)."""
    done = subprocess.run(
        [sys.executable, "-m", "molink.cli.main", "status", "--peer", tail],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "MOLINK_SWARM_KEY": KEY.text()},
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "swarm (from the DHT): 3 node(s)" in out, out
    assert "[0, 2): 2 replicas:" in out and "[2, 4): 1 node:" in out, out
    dht_rows = out.split("swarm (from the DHT)")[1]
    assert head_a in dht_rows and tail in dht_rows
    assert "/" in dht_rows and "blocks" in dht_rows and " cpu " in dht_rows, dht_rows
