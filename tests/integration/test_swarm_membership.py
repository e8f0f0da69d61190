"""The README's two-server commands with a swarm key added to each node (real processes on
this machine): the pipeline serves exactly what one process gives, ``molink status`` reads
it with the key, and a node holding another key, or none, has every call refused."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from molink.engine.offline import LLM
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import SWARM_KEY_ENV, generate_swarm_key
from molink.transport.channel import make_channel
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
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
    complete_all,
    mixed_cases,
    reference_completions,
    seed_command,
    wait_ready,
)

pytestmark = pytest.mark.integration

KEY = generate_swarm_key()


@pytest.fixture(scope="module")
def swarm(tiny_model_dir, tmp_path_factory) -> Iterator[tuple[ServerProcess, int, int]]:
    """Server 1 takes the key as a flag, server 2 from a file and the environment."""
    model = tiny_model_dir("qwen3")
    key_file = tmp_path_factory.mktemp("swarm") / "swarm.key"
    key_file.write_text(KEY.text() + "\n")
    grpc1, grpc2, http1, http2 = (free_port() for _ in range(4))
    head_command = seed_command(grpc1, 0, 1, http1, model) + ["--molink-swarm-key", KEY.text()]
    head = start_process(head_command, http1)
    processes = [head]
    try:
        wait_for_health(head, NODE_START_TIMEOUT_S, require_ready=False)
        stage_command = seed_command(grpc2, 1, -1, http2, model)
        stage_command += ["--molink-initial-peer", f"{LOOPBACK}:{grpc1}"]
        stage = start_process(stage_command + ["--molink-swarm-key-file", str(key_file)], http2)
        processes.append(stage)
        wait_for_health(stage, NODE_START_TIMEOUT_S, require_ready=False)
        wait_ready(head.base_url)
        yield head, grpc1, grpc2
    finally:
        for process in reversed(processes):
            stop_process(process.process, timeout=15)


async def test_seed_commands_with_a_key_serve_what_one_process_does(swarm, tiny_model_dir) -> None:
    head, _, _ = swarm
    llm = LLM(model=str(tiny_model_dir("qwen3")))
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), 4, (5, 12, 1, 8))
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    assert_same_completions(await complete_all(head.base_url, cases), expected, cases)
    log = head.log_path.read_text(errors="replace")
    assert "gRPC is mutual TLS" in log and "without a swarm key" not in log


def _status(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "molink.cli.main", "status", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )


def test_status_needs_the_key(swarm) -> None:
    _, grpc1, grpc2 = swarm
    peer = f"{LOOPBACK}:{grpc2}"
    with_key = _status("--peer", peer, env={SWARM_KEY_ENV: KEY.text()})
    assert with_key.returncode == 0, with_key.stderr
    assert "ready: every layer is served" in with_key.stdout
    assert with_key.stdout.count("serving") >= 2
    without = _status("--peer", peer, env={SWARM_KEY_ENV: ""})
    assert without.stdout.startswith(f"node at {peer} is unreachable"), without.stdout


@pytest.mark.parametrize("outsider", ["no key", "another key"])
def test_outsiders_are_refused_on_every_call(swarm, outsider: str) -> None:
    _, grpc1, grpc2 = swarm
    config = (
        TransportConfig()
        if outsider == "no key"
        else TransportConfig(security=SwarmCredentials.from_key(generate_swarm_key()))
    )
    join = pb.JoinRequest(node=pb.NodeInfo(node_id="intruder", address="127.0.0.1:1"))
    calls = {
        "Describe": lambda s: s.Describe(pb.DescribeRequest(), timeout=5),
        "GetPipeline": lambda s: s.GetPipeline(pb.GetPipelineRequest(), timeout=5),
        "Join": lambda s: s.Join(join, timeout=5),
        "UpdatePipeline": lambda s: s.UpdatePipeline(pb.Pipeline(epoch=10**6), timeout=5),
        "Forward": lambda s: list(s.Forward(iter([pb.ForwardRequest()]), timeout=5)),
        "ReturnResults": lambda s: list(
            s.ReturnResults(iter([pb.ReturnResultsRequest()]), timeout=5)
        ),
        "Release": lambda s: s.Release(pb.ReleaseRequest(seq_ids=[0]), timeout=5),
        "Health": lambda s: s.Health(pb.HealthRequest(), timeout=5),
    }
    for port in (grpc1, grpc2):
        channel = make_channel(f"{LOOPBACK}:{port}", config)
        try:
            stub = pb_grpc.MolinkNodeStub(channel)
            for name, call in calls.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call(stub)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, name
        finally:
            channel.close()
