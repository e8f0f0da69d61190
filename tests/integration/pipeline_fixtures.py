"""A real pipeline for tests: the head and every stage as ``molink serve`` processes.

Each node is ``molink serve --molink-enabled`` on 127.0.0.1 with one torch thread, its own
HTTP and gRPC ports and a log file. A stage starts its HTTP server only after it has
joined the head, so "its /health answers" means "it joined". Every wait is bounded, and
every process is stopped (SIGTERM, then SIGKILL) when the ``running_pipeline`` block ends.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from molink.transport.channel import NodeClient
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.server_process import (
    LOOPBACK,
    ServerProcess,
    free_port,
    start_process,
    stop_process,
    wait_for_health,
)
from tests.integration.conftest import is_idle, parse_metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Children import torch and load weights; slow on a small, shared machine.
NODE_START_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
# One torch thread per process: several processes share two cores. The DHT (on by
# default) adds its daemons to every node's start; the tests that are about discovery,
# and the seed commands' tests, run with it (a test's own flags come after these).
NODE_ARGS = ("--num-threads", "1", "--log-level", "info", "--molink-dht", "off")
_POLL_S = 0.1


@dataclass
class Node:
    """One pipeline node process."""

    server: ServerProcess
    grpc_port: int
    start_layer: int
    end_layer: int  # as given on the command line; -1: to the last layer

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def grpc_address(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def process(self) -> subprocess.Popen:
        return self.server.process

    def log_text(self) -> str:
        try:
            return self.server.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL: the node vanishes without closing anything, as a crashed machine."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=STOP_TIMEOUT_S)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"node {self.grpc_address} still runs after {timeout:.0f}s:\n{self.log_text()[-3000:]}"
            ) from None


def node_command(
    http_port: int,
    grpc_port: int,
    start_layer: int,
    end_layer: int,
    model: str | None = None,
    initial_peer: str | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    argv = [sys.executable, "-m", "molink.cli.main", "serve", "--host", LOOPBACK]
    argv += ["--port", str(http_port), "--molink-enabled", "--molink-grpc-port", str(grpc_port)]
    argv += ["--molink-start-layer", str(start_layer), "--molink-end-layer", str(end_layer)]
    if model is not None:
        argv += ["--model", model]
    if initial_peer is not None:
        argv += ["--molink-initial-peer", initial_peer]
    return [*argv, *NODE_ARGS, *extra_args]


def seed_command(grpc_port: int, start: int, end: int, http_port: int, model: Path) -> list[str]:
    """The seed README's server command, as written there (every other flag at its
    default), for a tiny model with one torch thread."""
    return [
        sys.executable, "-m", "molinkv1.entrypoints.api_server",
        "--model", str(model),
        "--molink-enabled",
        "--molink-grpc-port", str(grpc_port),
        "--molink-start-layer", str(start),
        "--molink-end-layer", str(end),
        "--port", str(http_port),
        "--max-model-len", "256",
        "--num-threads", "1",
    ]  # fmt: skip


def start_node(
    start_layer: int,
    end_layer: int,
    model: str | None = None,
    initial_peer: str | None = None,
    extra_args: Sequence[str] = (),
    grpc_port: int | None = None,
) -> Node:
    """Start one node and return at once (see ``wait_answering``)."""
    http_port, grpc_port = free_port(), grpc_port or free_port()
    command = node_command(
        http_port, grpc_port, start_layer, end_layer, model, initial_peer, extra_args
    )
    logger.info("starting node: %s", " ".join(command))
    return Node(start_process(command, http_port), grpc_port, start_layer, end_layer)


def wait_answering(node: Node, timeout: float = NODE_START_TIMEOUT_S) -> None:
    """Until the node's HTTP server answers (for a stage: it has joined its head)."""
    wait_for_health(node.server, timeout, require_ready=False)


def stop_node(node: Node) -> None:
    with contextlib.suppress(Exception):
        stop_process(node.process, timeout=STOP_TIMEOUT_S)


@dataclass
class Pipeline:
    """A head and its stages, in layer order; ``nodes[0]`` is the head."""

    model: str | None
    nodes: list[Node] = field(default_factory=list)
    extra_nodes: list[Node] = field(default_factory=list)  # started later by the test

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def base_url(self) -> str:
        return self.head.base_url

    def start_stage(
        self,
        start_layer: int,
        end_layer: int,
        model: str | None = None,
        extra_args: Sequence[str] = (),
        grpc_port: int | None = None,
    ) -> Node:
        """Another node joining through the head; stopped with the pipeline."""
        node = start_node(
            start_layer,
            end_layer,
            model if model is not None else self.model,
            self.head.grpc_address,
            extra_args,
            grpc_port,
        )
        self.extra_nodes.append(node)
        return node

    def all_nodes(self) -> list[Node]:
        return [*self.nodes, *self.extra_nodes]


def head_health(base_url: str) -> tuple[int, str]:
    """The head's /health: status code and error message ("" when ready)."""
    response = httpx.get(f"{base_url}/health", timeout=5.0)
    if response.status_code == 200:
        return 200, ""
    return response.status_code, response.json()["error"]["message"]


def wait_ready(base_url: str, timeout: float = READY_TIMEOUT_S) -> None:
    wait_until(lambda: head_health(base_url)[0] == 200, timeout, f"{base_url}/health is 200")


@contextlib.contextmanager
def running_pipeline(
    bounds: Sequence[int],
    model: str | None = None,
    extra_args: Sequence[str] = (),
    stage_args: dict[int, Sequence[str]] | None = None,
) -> Iterator[Pipeline]:
    """Nodes serving ``[bounds[i], bounds[i+1])`` (the last one to -1), ready to serve.

    Nodes start one after another, so that at most one loads weights at a time.
    ``stage_args`` adds flags to the node of that index (0 is the head).
    """
    pipeline = Pipeline(model)
    ends = [*bounds[1:-1], -1]
    try:
        for index, (start, end) in enumerate(zip(bounds[:-1], ends, strict=True)):
            peer = pipeline.head.grpc_address if index else None
            args = [*extra_args, *(stage_args or {}).get(index, ())]
            node = start_node(start, end, model, peer, args)
            pipeline.nodes.append(node)
            wait_answering(node)
        wait_ready(pipeline.base_url)
        yield pipeline
    finally:
        for node in reversed(pipeline.all_nodes()):
            stop_node(node)


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    """Polls ``predicate``; ``what`` (or what it returns, at the time out) names the wait."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if predicate():
                return
        if time.monotonic() > deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:.0f}s waiting until {described}")
        time.sleep(_POLL_S)


def call_node(
    address: str, method: Callable[[NodeClient], T], config: TransportConfig | None = None
) -> T:
    """One unary call to a node's gRPC service (bounded by the transport's rpc timeout)."""
    client = NodeClient(address, config or TransportConfig())
    try:
        return method(client)
    finally:
        client.close()


def stage_health(node: Node, config: TransportConfig | None = None) -> pb.HealthResponse:
    return call_node(node.grpc_address, NodeClient.health, config)


def stage_info(node: Node) -> pb.NodeInfo:
    return call_node(node.grpc_address, NodeClient.describe)


def served_model_name(base_url: str) -> str:
    response = httpx.get(f"{base_url}/v1/models", timeout=10.0)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def log_path(node: Node) -> Path:
    return node.server.log_path


def head_metrics(base_url: str) -> dict[str, float]:
    response = httpx.get(f"{base_url}/metrics", timeout=10.0)
    response.raise_for_status()
    return parse_metrics(response.text)


def held_sequences(pipeline: Pipeline) -> dict[str, int]:
    """How many sequences each live node of the route holds, by gRPC address."""
    return {
        node.grpc_address: stage_health(node).active_sequences
        for node in pipeline.all_nodes()
        if node.process.poll() is None
    }


def wait_pipeline_idle(pipeline: Pipeline, timeout: float = READY_TIMEOUT_S) -> None:
    """Until the head has no request and every KV block free, and no node holds a sequence."""
    wait_until(lambda: is_idle(head_metrics(pipeline.base_url)), timeout, "the head is idle")
    wait_until(
        lambda: not any(held_sequences(pipeline).values()),
        timeout,
        lambda: f"no node holds a sequence (now {held_sequences(pipeline)})",
    )


# -- requests and their single-process reference ------------------------------------------

REQUEST_TIMEOUT_S = 300.0
LOGPROB_TOLERANCE = 1e-3
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. MoLink serves one language model from "
    "machines joined by ordinary networks: home broadband, campus Ethernet, the public "
    "internet. Each machine holds a contiguous range of decoder layers, and activations "
    "flow from stage to stage until the last one samples the next token. What is the "
    "capital of France? Paris is the capital of France, and Berlin is the capital of "
    "Germany. Hello world! 0123456789"
)


@dataclass(frozen=True)
class Case:
    """One request: token-id prompt, length, streamed or not, greedy or seeded."""

    prompt: list[int]
    max_tokens: int
    stream: bool
    seed: int | None = None  # None: greedy; else temperature 1 with this seed
    ignore_eos: bool = False

    @property
    def temperature(self) -> float:
        return 0.0 if self.seed is None else 1.0


@dataclass(frozen=True)
class Completion:
    """What came back for one request: the text of each token, the text, why it ended."""

    tokens: tuple[str, ...]
    text: str
    finish_reason: str | None
    logprobs: tuple[float, ...] = ()


def mixed_cases(token_ids: list[int], num: int, max_tokens: Sequence[int]) -> list[Case]:
    """``num`` prompts of different lengths cut from ``token_ids``; every other one
    streamed, every other pair seeded, lengths cycling through ``max_tokens``."""
    cases = []
    for index in range(num):
        length = 2 + (index * 11) % 53  # 2 to 50 tokens, in no particular order
        prompt = (token_ids * 2)[index : index + length]
        seeded = index % 4 >= 2
        cases.append(
            Case(
                prompt=prompt,
                max_tokens=max_tokens[index % len(max_tokens)],
                stream=index % 2 == 1,
                seed=1000 + index if seeded else None,
                ignore_eos=index % 3 == 0,
            )
        )
    return cases


def reference_completions(llm: object, cases: Sequence[Case]) -> list[Completion]:
    """The cases through ``molink.engine.offline.LLM`` (one process, one batch)."""
    from molink.api.logprobs import token_text
    from molink.sampling_params import SamplingParams

    params = [
        SamplingParams(
            max_tokens=case.max_tokens,
            temperature=case.temperature,
            seed=case.seed,
            ignore_eos=case.ignore_eos,
            logprobs=0,
        )
        for case in cases
    ]
    outputs = llm.generate([case.prompt for case in cases], params)  # type: ignore[attr-defined]
    tokenizer = llm.tokenizer  # type: ignore[attr-defined]
    completions = []
    for output in outputs:
        choice = output.outputs[0]
        tokens = tuple(token_text(tokenizer, token_id) for token_id in choice.token_ids)
        completions.append(
            Completion(tokens, choice.text, choice.finish_reason, tuple(choice.logprobs or ()))
        )
    return completions


async def complete(client: object, model: str, case: Case) -> Completion:
    """One /v1/completions request through the openai SDK, streamed or not."""
    response = await client.completions.create(  # type: ignore[attr-defined]
        model=model,
        prompt=case.prompt,
        max_tokens=case.max_tokens,
        temperature=case.temperature,
        seed=case.seed,
        logprobs=0,
        stream=case.stream,
        extra_body={"ignore_eos": case.ignore_eos},
    )
    if not case.stream:
        choice = response.choices[0]
        logprobs = choice.logprobs
        return Completion(
            tuple(logprobs.tokens),
            choice.text,
            choice.finish_reason,
            tuple(logprobs.token_logprobs),
        )
    tokens: list[str] = []
    values: list[float] = []
    text, finish_reason = "", None
    async for chunk in response:
        for choice in chunk.choices:
            text += choice.text
            if choice.logprobs is not None and choice.logprobs.tokens:
                tokens += choice.logprobs.tokens
                values += choice.logprobs.token_logprobs
            finish_reason = choice.finish_reason or finish_reason
    return Completion(tuple(tokens), text, finish_reason, tuple(values))


async def complete_all(base_url: str, cases: Sequence[Case]) -> list[Completion]:
    """Every case at once against ``base_url`` (all in flight together)."""
    import asyncio

    import openai

    model = served_model_name(base_url)
    client = openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S
    )
    try:
        return await asyncio.wait_for(
            asyncio.gather(*(complete(client, model, case) for case in cases)),
            timeout=REQUEST_TIMEOUT_S,
        )
    finally:
        await client.close()


def assert_same_completions(
    got: Sequence[Completion], expected: Sequence[Completion], cases: Sequence[Case]
) -> None:
    """Token for token, the same text and finish reason, logprobs within tolerance."""
    assert len(got) == len(expected)
    for index, (actual, reference, case) in enumerate(zip(got, expected, cases, strict=True)):
        where = f"request {index} ({case})"
        assert actual.tokens == reference.tokens, f"{where}: {actual} != {reference}"
        assert actual.text == reference.text, where
        assert actual.finish_reason == reference.finish_reason, where
        assert len(actual.logprobs) == len(reference.logprobs), where
        for position, (a, b) in enumerate(zip(actual.logprobs, reference.logprobs, strict=True)):
            assert abs(a - b) <= LOGPROB_TOLERANCE, f"{where}: token {position}: {a} vs {b}"


def metric_series(base_url: str, name: str) -> dict[str, float]:
    """Every sample of metric ``name`` on the head's /metrics, keyed by its label text."""
    response = httpx.get(f"{base_url}/metrics", timeout=10.0)
    response.raise_for_status()
    series: dict[str, float] = {}
    for line in response.text.splitlines():
        key, _, value = line.rpartition(" ")
        metric, _, labels = key.partition("{")
        if metric == name and not line.startswith("#"):
            series[labels.rstrip("}")] = float(value)
    return series


def assert_traffic_counted(pipeline: Pipeline, min_tokens: int) -> None:
    """/metrics counts bytes on every hop, the return to the head included."""
    hops = metric_series(pipeline.base_url, "molink:pipeline_bytes_sent_total")
    assert len(hops) == len(pipeline.nodes), hops
    assert all(value > 0 for value in hops.values()), hops
    expected = {
        f'hop="{a.grpc_address}->{b.grpc_address}"'
        for a, b in zip(pipeline.nodes, [*pipeline.nodes[1:], pipeline.head], strict=True)
    }
    assert set(hops) == expected, hops
    sampled = metric_series(pipeline.base_url, "molink:pipeline_sampled_tokens_total")
    assert sampled[""] >= min_tokens, sampled
