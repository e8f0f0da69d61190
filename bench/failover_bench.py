"""What a failover costs: a replica killed under load, and how long its streams pause.

A head ``[0, split)`` and two replicas of ``[split, L)``, ``--num-threads 1`` each. N
streamed greedy requests run at once, each with a context of about 512 tokens (a
``--prompt-tokens`` prompt, then generation, ``ignore_eos``); once every stream has
tokens, the replica holding the most sequences gets SIGKILL. The head evicts it and
replays its sequences on the other replica (prefilling their prompt and the tokens
generated so far). Recorded for N in ``--sequences`` (default 1, 8, 32), on loopback and
behind link emulators (``--rate-mbit`` / ``--rtt-ms``, default 100 Mbit/s and 30 ms, on
every hop: head -> each replica and back):

* kill -> next token: for each stream, the time from the kill to its first token after it
  (streams on the survivor barely pause; a moved stream's first one may have been on its
  way when the replica died), and to the token that ends its longest pause after the kill
  (``kill_to_resumed_s``: for a moved stream, its first token after the replay); max,
  median and p90 over the streams; the longest pause between two tokens of a stream from
  its last token before the kill on; and the head's own measure (failure noticed -> first
  replayed token, ``molink:failover_recovery_seconds``). The run waits for two tokens
  after the kill from every stream;
* the survivors: the streams on the replica that lived, and their longest pause between
  two tokens while the moved ones were being replayed. Which stream was where is not
  visible through the API, so they are taken to be the streams that paused least, as many
  as the survivor held before the kill (a moved stream waits for the loss to be noticed
  and its KV to be rebuilt); every stream's longest pause is recorded, sorted, to show
  the gap between the two groups. (Choosing by the first token after the kill instead is
  fooled by a moved stream's token already on its way when the replica died.)
* the throughput dip: generated tokens per second in 1 s bins over the 10 s around the
  kill, and the lowest bin against the mean of the bins before it;
* failovers, replayed sequences and tokens from the head's /metrics;
* the context each stream had at the kill, the seconds from sending the prompts to the
  first tokens, the 1-minute load average, and each node process's CPU seconds before
  and after the kill (the machine is shared: figures from a loaded one are noisy).

Each replica gets ``--replica-kv-memory`` of KV cache (1 GiB: with 512 MiB, one replica
of [15, 30) in float32 holds 25 sequences of 448 + 464 tokens, and after the kill the
moved sequences beyond that waited for running ones to finish). The nodes run without
the DHT and join through the head.

The victim is started again with its command before the next N.

    python bench/failover_bench.py [--model DIR] [--sequences 1,8,32] [--links loopback,shaped]
        [--prompt-tokens 448] [--transmission-scheduling on|off]

``--transmission-scheduling off`` runs the same with prefills and replays unpaced, the
baseline for the survivors' pauses.

Writes ``bench/results/failover.json`` (``--name`` to change); exits 1 if a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    LOOPBACK,
    ServerProcess,
    fetch_metrics,
    free_port,
    molink_serve_command,
    start_server,
    stop_server,
    wait_for_health,
    write_results,
)
from molink.netem import LinkEmulator, LinkSpec  # noqa: E402
from molink.transport.channel import NodeClient  # noqa: E402
from molink.transport.config import TransportConfig  # noqa: E402

logger = logging.getLogger("failover_bench")

WINDOW_S = 10.0  # the throughput window around the kill
STARTUP_S = 300.0


@dataclass(frozen=True)
class Config:
    model: str | None
    split: int
    prompt_tokens: int
    max_tokens: int
    sequences: tuple[int, ...]
    links: tuple[str, ...]
    rate_mbit: float
    rtt_ms: float
    transmission_scheduling: str
    read_timeout_s: float = 900.0
    replica_kv_memory: str = "1GiB"

    def flags(self) -> list[str]:
        model = ["--model", self.model] if self.model else []
        return [
            *model,
            "--dtype", "float32",
            "--num-threads", "1",
            "--max-num-seqs", "64",
            "--log-level", "info",
            "--molink-enabled",
            "--molink-advertise-host", LOOPBACK,
            "--molink-transmission-scheduling", self.transmission_scheduling,
            # Nodes join through the initial peer. With the DHT, a killed replica's record,
            # renewed just before the kill, brought it back into the routes for a moment.
            "--molink-dht", "off",
        ]  # fmt: skip


@dataclass
class Node:
    name: str
    command: list[str]
    http_port: int
    grpc_port: int
    server: ServerProcess | None = None


@dataclass
class Deployment:
    nodes: dict[str, Node] = field(default_factory=dict)
    emulators: list[LinkEmulator] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.nodes['head'].http_port}"


def _start(node: Node) -> None:
    node.server = start_server(node.command, node.http_port, {"OMP_NUM_THREADS": "1"})


def _wait_answering(node: Node) -> None:
    assert node.server is not None
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if node.server.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited:\n{node.server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://{LOOPBACK}:{node.http_port}/health", timeout=2.0)
            return
        time.sleep(0.2)
    raise TimeoutError(f"{node.name} did not answer")


@contextlib.contextmanager
def deployed(config: Config, shaped: bool) -> Iterator[Deployment]:
    """Head and two replicas; with ``shaped``, each listens behind an emulator that peers
    dial (the replicas join the head on its real port, then use advertised ones)."""
    deployment = Deployment()
    grpc = {name: free_port() for name in ("head", "a", "b")}
    advertised = dict(grpc)
    try:
        if shaped:
            link = LinkSpec.from_rtt(config.rate_mbit, config.rtt_ms)
            for name, port in grpc.items():
                emulator = LinkEmulator(LOOPBACK, 0, LOOPBACK, port, up=link).start()
                deployment.emulators.append(emulator)
                advertised[name] = emulator.port
        for name in ("head", "a", "b"):
            http = free_port()
            layers = ["0", str(config.split)] if name == "head" else [str(config.split), "-1"]
            args = [
                *config.flags(),
                "--molink-grpc-port", str(grpc[name]),
                "--molink-advertise-port", str(advertised[name]),
                "--molink-start-layer", layers[0],
                "--molink-end-layer", layers[1],
            ]  # fmt: skip
            if name != "head":
                args += ["--molink-initial-peer", f"{LOOPBACK}:{grpc['head']}"]
                # One replica must be able to hold every sequence once the other is killed.
                args += ["--kv-cache-memory", config.replica_kv_memory]
            node = Node(name, molink_serve_command(http, args), http, grpc[name])
            deployment.nodes[name] = node
            _start(node)
            _wait_answering(node)
        head = deployment.nodes["head"].server
        assert head is not None
        wait_for_health(head, STARTUP_S)
        yield deployment
    finally:
        for node in reversed(list(deployment.nodes.values())):
            if node.server is not None:
                stop_server(node.server)
        for emulator in deployment.emulators:
            emulator.stop()


def _cpu_seconds(deployment: Deployment) -> dict[str, float]:
    """User + system CPU seconds of each live node process so far (its threads included),
    read from /proc (Linux)."""
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for name, node in deployment.nodes.items():
        if node.server is None or node.server.process.poll() is not None:
            continue
        try:
            stat = Path(f"/proc/{node.server.process.pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds[name] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return seconds


def _cpu_between(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """CPU seconds each node spent between two readings (of the nodes in both)."""
    return {name: round(after[name] - before[name], 2) for name in after if name in before}


def _active(node: Node) -> int:
    client = NodeClient(f"{LOOPBACK}:{node.grpc_port}", TransportConfig())
    try:
        return client.health(timeout=5.0).active_sequences
    except Exception:
        return -1
    finally:
        client.close()


async def _stream(http: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                  times: list[float]) -> None:  # fmt: skip
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    async with http.stream("POST", "/v1/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"text"' in line:
                times.append(time.monotonic())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _longest_pause(times: list[float], kill: float) -> float:
    before = [t for t in times if t <= kill]
    after = [t for t in times if t > kill]
    points = before[-1:] + after
    return max((b - a for a, b in zip(points, points[1:], strict=False)), default=float("nan"))


def _resumed_after(times: list[float], kill: float) -> float:
    """Seconds from the kill to the token that ends the stream's longest pause after it."""
    before = [t for t in times if t <= kill]
    after = [t for t in times if t > kill]
    points = before[-1:] + after
    if len(points) < 2:
        return float("nan")
    _, end = max(zip(points, points[1:], strict=False), key=lambda pair: pair[1] - pair[0])
    return end - kill


def _bins(all_times: list[float], kill: float) -> list[int]:
    start = kill - WINDOW_S / 2
    counts = [0] * int(WINDOW_S)
    for t in all_times:
        index = int(t - start)
        if 0 <= index < len(counts):
            counts[index] += 1
    return counts


async def measure(deployment: Deployment, config: Config, count: int) -> dict[str, Any]:
    base = deployment.base_url
    model = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
    before = fetch_metrics(base)
    times: list[list[float]] = [[] for _ in range(count)]
    # Under load the last of 32 prompts waits for the others' prefills before its first
    # token: the read timeout must cover that.
    timeout = httpx.Timeout(30.0, read=config.read_timeout_s)
    load_before, cpu_before, started = os.getloadavg(), _cpu_seconds(deployment), time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as http:
        prompts = [[(7 * i + j) % 1000 + 10 for j in range(config.prompt_tokens)]
                   for i in range(count)]  # fmt: skip
        tasks = [
            asyncio.ensure_future(_stream(http, model, p, config.max_tokens, t))
            for p, t in zip(prompts, times, strict=True)
        ]
        deadline = time.monotonic() + config.read_timeout_s
        while min(len(t) for t in times) < 8:  # every stream is generating
            if time.monotonic() > deadline or any(task.done() for task in tasks):
                raise RuntimeError("the streams did not get going (or ended early)")
            await asyncio.sleep(0.05)
        await asyncio.sleep(WINDOW_S / 2)  # the steady state before the kill
        replicas = [deployment.nodes["a"], deployment.nodes["b"]]
        for node in replicas:  # killed from outside (out of memory, ...): no valid run
            if node.server is None or node.server.process.poll() is not None:
                raise RuntimeError(f"replica {node.name} exited before the kill")
        held = {node.name: _active(node) for node in replicas}
        victim = max(replicas, key=lambda node: held[node.name])
        assert victim.server is not None
        cpu_at_kill = _cpu_seconds(deployment)
        victim.server.process.send_signal(signal.SIGKILL)
        kill = time.monotonic()
        # A moved stream's first token after the kill may have been on its way already:
        # wait for a second one (after its replay) from every stream.
        deadline = kill + config.read_timeout_s
        while any(len([x for x in t if x > kill]) < 2 for t in times) or (
            time.monotonic() < kill + WINDOW_S / 2
        ):
            if time.monotonic() > deadline or any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    cpu_after = _cpu_seconds(deployment)  # the head's and the survivor's
    contexts = [config.prompt_tokens + len([x for x in t if x <= kill]) for t in times]
    gaps = [min((x for x in t if x > kill), default=float("nan")) - kill for t in times]
    resumed = [_resumed_after(t, kill) for t in times]
    pauses = [_longest_pause(t, kill) for t in times]
    survivors = sorted(range(count), key=lambda i: pauses[i])[: max(0, min(held.values()))]
    after = fetch_metrics(base)
    bins = _bins([x for t in times for x in t], kill)
    steady = statistics.mean(bins[: int(WINDOW_S / 2)]) if bins else 0.0
    return {
        "sequences": count,
        "victim_held_sequences": held[victim.name],
        "survivor_held_sequences": min(held.values()),
        "kill_to_next_token_s": {
            "max": max(gaps),
            "median": statistics.median(gaps),
            "p90": _percentile(gaps, 0.9),
        },
        # Per stream, the token that ends its longest pause after the kill: for a moved
        # stream its first token after the replay (the one right after the kill may have
        # been on its way), for a stream on the survivor its slowest step.
        "kill_to_resumed_s": {
            "max": max(resumed),
            "median": statistics.median(resumed),
            "p90": _percentile(resumed, 0.9),
        },
        # The longest gap between two tokens of a stream from the last one before the kill
        # on (a token already on its way when the victim died arrives after the kill).
        "longest_pause_s": {"max": max(pauses), "median": statistics.median(pauses)},
        "survivors": {
            "streams": len(survivors),
            "kill_to_next_token_s_max": max((gaps[i] for i in survivors), default=None),
            "longest_pause_s_max": max((pauses[i] for i in survivors), default=None),
        },
        "longest_pause_s_sorted": sorted(pauses),
        "head_recovery_s_max": after.get("molink:failover_recovery_seconds_max"),
        "tokens_per_s_bins": bins,
        "dip": {
            "steady_tokens_per_s": steady,
            "lowest_bin": min(bins),
            "lowest_vs_steady": min(bins) / steady if steady else None,
        },
        "failovers": after.get("molink:failovers_total", 0)
        - before.get("molink:failovers_total", 0),
        "replayed_sequences": after.get("molink:replayed_sequences_total", 0)
        - before.get("molink:replayed_sequences_total", 0),
        "replayed_tokens": after.get("molink:replayed_tokens_total", 0)
        - before.get("molink:replayed_tokens_total", 0),
        "victim": victim.name,
        "context_tokens_at_kill": {"min": min(contexts), "max": max(contexts)},
        "first_tokens_s": started_to_first(times, started),
        "load_average_1m": {"start": load_before[0], "end": os.getloadavg()[0]},
        # Node processes' CPU seconds from the start of the requests to the kill (all
        # three), and from the kill to the end (head and survivor).
        "cpu_s": {
            "to_kill": _cpu_between(cpu_before, cpu_at_kill),
            "after_kill": _cpu_between(cpu_at_kill, cpu_after),
            "seconds_to_kill": round(kill - started, 1),
            "seconds_after_kill": round(time.monotonic() - kill, 1),
        },
    }


def started_to_first(times: list[list[float]], started: float) -> dict[str, float]:
    """Seconds from sending the requests to the streams' first tokens (the last one: the
    prefill of every prompt before it)."""
    firsts = [t[0] - started for t in times if t]
    return {"median": statistics.median(firsts), "max": max(firsts)} if firsts else {}


def _restart(deployment: Deployment, name: str) -> None:
    node = deployment.nodes[name]
    _start(node)
    _wait_answering(node)
    head_url = deployment.base_url
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:  # the head routes over both replicas again
        client = NodeClient(f"{LOOPBACK}:{deployment.nodes['head'].grpc_port}", TransportConfig())
        try:
            if len(client.get_pipeline(timeout=5).stages) == 3:
                break
        finally:
            client.close()
        time.sleep(0.5)
    httpx.get(f"{head_url}/health", timeout=10).raise_for_status()


def run_link(config: Config, link: str, runs: list[dict[str, Any]], save) -> None:
    """Appends each N's result to ``runs`` and saves after each (a long run keeps what it
    measured when it is stopped)."""
    with deployed(config, shaped=link == "shaped") as deployment:
        for count in config.sequences:
            logger.info("%s: %d sequences", link, count)
            result = asyncio.run(measure(deployment, config, count))
            logger.info("%s", json.dumps(result))
            runs.append(result)
            save()
            _restart(deployment, result["victim"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the server's)")
    parser.add_argument("--split", type=int, default=15)
    parser.add_argument("--prompt-tokens", type=int, default=448)
    parser.add_argument("--max-tokens", type=int, default=64 + 400)
    parser.add_argument("--sequences", default="1,8,32")
    parser.add_argument("--links", default="loopback,shaped")
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument(
        "--transmission-scheduling",
        choices=("on", "off"),
        default="on",
        help="off: prefills and replays are not paced (the baseline)",
    )
    parser.add_argument("--name", default="failover")
    parser.add_argument(
        "--replica-kv-memory",
        default="1GiB",
        help="each replica's KV cache: room for every sequence's prompt and max tokens on "
        "one replica (at 32 x (448 + 464) tokens, 512MiB holds 25 on [15, 30) in float32; "
        "the rest of the moved ones would wait for running ones to finish)",
    )
    parser.add_argument(
        "--read-timeout", type=float, default=900.0, help="seconds a stream may wait for a token"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = Config(
        model=args.model,
        split=args.split,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        sequences=tuple(int(n) for n in args.sequences.split(",")),
        links=tuple(args.links.split(",")),
        rate_mbit=args.rate_mbit,
        rtt_ms=args.rtt_ms,
        transmission_scheduling=args.transmission_scheduling,
        read_timeout_s=args.read_timeout,
        replica_kv_memory=args.replica_kv_memory,
    )
    results: dict[str, Any] = {"config": config.__dict__ | {"sequences": list(config.sequences)}}
    failed = False
    for link in config.links:
        runs: list[dict[str, Any]] = []
        results[link] = runs
        try:
            run_link(config, link, runs, lambda: write_results(args.name, results))
        except Exception as exc:
            logger.exception("%s failed", link)
            runs.append({"error": str(exc)})
            failed = True
        write_results(args.name, results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
