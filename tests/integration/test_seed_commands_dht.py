"""The seed README's two-server commands, verbatim (no swarm key, no discovery flag): the
nodes run the swarm's DHT by default, the second bootstrapping from the first's; the
pipeline serves exactly what one process gives, and ``molink status`` reads every node's
record, key and measured speed from the DHT and the head."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key

from molink.engine.offline import LLM
from molink.transport.channel import NodeClient
from tests.helpers.server_process import (
    LOOPBACK,
    REPO_ROOT,
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_health,
)
from tests.integration.pipeline_fixtures import (
    NODE_START_TIMEOUT_S,
    PASSAGE,
    assert_same_completions,
    call_node,
    complete_all,
    mixed_cases,
    reference_completions,
    seed_command,
    wait_ready,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def seed_pipeline(tiny_model_dir) -> Iterator[tuple[ServerProcess, ServerProcess, str, str]]:
    model = tiny_model_dir("qwen3")
    grpc1, grpc2, http1, http2 = (free_port() for _ in range(4))
    head = start_process(seed_command(grpc1, 0, 1, http1, model), http1)
    processes = [head]
    try:
        wait_for_health(head, NODE_START_TIMEOUT_S, require_ready=False)
        stage_command = seed_command(grpc2, 1, -1, http2, model)
        stage_command += ["--molink-initial-peer", f"{LOOPBACK}:{grpc1}"]
        stage = start_process(stage_command, http2)
        processes.append(stage)
        wait_for_health(stage, NODE_START_TIMEOUT_S, require_ready=False)
        wait_ready(head.base_url)
        yield head, stage, f"{LOOPBACK}:{grpc1}", f"{LOOPBACK}:{grpc2}"
    finally:
        for process in reversed(processes):
            stop_process(process.process, timeout=15)


async def test_the_seed_commands_serve_what_one_process_does(seed_pipeline, tiny_model_dir):
    head, stage, _, _ = seed_pipeline
    llm = LLM(model=str(tiny_model_dir("qwen3")))
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), 4, (5, 12, 1, 8))
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    assert_same_completions(await complete_all(head.base_url, cases), expected, cases)
    assert "DHT node at" in head.log_path.read_text(errors="replace")
    assert "DHT node at" in stage.log_path.read_text(errors="replace")


def test_both_nodes_take_part_in_the_dht_with_their_keys(seed_pipeline) -> None:
    _, _, head_address, stage_address = seed_pipeline
    for address in (head_address, stage_address):
        info = call_node(address, NodeClient.describe)
        # Advertised on the host the node advertises for gRPC (the machine's own address).
        host = info.address.rpartition(":")[0]
        assert info.dht_address.startswith(f"/ip4/{host}/tcp/"), info.dht_address
        # An open node's record carries its real identity key (named by its address).
        assert isinstance(load_der_public_key(info.public_key), ec.EllipticCurvePublicKey)
        assert info.node_id == info.address and info.layer_step_s > 0


def _status(peer: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "molink.cli.main", "status", "--peer", peer],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_status_reads_the_swarm_from_the_dht(seed_pipeline) -> None:
    _, _, head_address, stage_address = seed_pipeline
    # The stage's record is stored by the head's DHT once it announced itself.
    wait_until(
        lambda: "swarm (from the DHT): 2 node(s)" in _status(stage_address),
        60,
        lambda: f"the DHT holds both records; status says:\n{_status(stage_address)}",
    )
    text = _status(head_address)
    assert "ready: every layer is served" in text
    head_id = call_node(head_address, NodeClient.describe).node_id
    stage_id = call_node(stage_address, NodeClient.describe).node_id
    assert f"[0, 1): 1 node: {head_id}" in text
    assert f"[1, 4): 1 node: {stage_id}" in text
    # Each node's speed, in the head's view and in the DHT's records.
    headers = [line for line in text.splitlines() if "LAYER STEP" in line]
    assert len(headers) == 2 and all("TOKENS/S" in header for header in headers)
