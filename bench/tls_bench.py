"""What the swarm key costs on the wire: mutual TLS against plaintext gRPC.

Two parts, each comparing the two side by side in one run:

* ``transport``: gRPC alone on loopback, no model. A stream of 1 MiB messages (a prefill's
  activations) for throughput, 4 KiB unary round trips (a decode step's), and a new
  channel's first call (connection and handshake). Plaintext and TLS rounds alternate.
* ``pipeline``: two arithmetic stages in this process (``bench/tls_pipeline.py``), on
  loopback and through the emulated 100 Mbit/s, 30 ms link: step round trip and prefill
  transfer rate, without and with the key, rounds alternating.
* ``serving``: SmolLM2 split over two ``molink serve`` processes (the weak-link benchmark's
  deployment, ``bench/weak_link_bench.py``), on plain loopback and behind the emulated
  100 Mbit/s, 30 ms link, each without and with ``--molink-swarm-key-file``: output
  throughput and TPOT under a Poisson load of mixed prompts.

    python bench/tls_bench.py [--parts transport,pipeline,serving] [--requests 12] [--rounds 3]

Writes ``bench/results/tls.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

import grpc  # noqa: E402

from bench.common import LOOPBACK, write_results  # noqa: E402
from bench.tls_pipeline import pipeline_part  # noqa: E402
from bench.weak_link_bench import BenchConfig, Mode, Rate, deployed, measure  # noqa: E402
from molink.security.credentials import SwarmCredentials  # noqa: E402
from molink.security.swarm_key import generate_swarm_key  # noqa: E402
from molink.transport.channel import add_server_port, make_channel  # noqa: E402
from molink.transport.config import TransportConfig  # noqa: E402

logger = logging.getLogger("tls_bench")

_SERVICE = "bench.Echo"
_BIG = 1 << 20
_SMALL = 4 << 10


# -- transport ------------------------------------------------------------------------------


def _ack(request_iterator, context):
    for message in request_iterator:
        yield len(message).to_bytes(8, "little")


def _echo(request: bytes, context) -> bytes:
    return request


def _server(config: TransportConfig) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ])  # fmt: skip
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(_ack),
        "Unary": grpc.unary_unary_rpc_method_handler(_echo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
    port = add_server_port(server, f"{LOOPBACK}:0", config)
    server.start()
    return server, f"{LOOPBACK}:{port}"


def _transport_round(config: TransportConfig, big: int, small: int, handshakes: int) -> dict:
    server, address = _server(config)
    try:
        channel = make_channel(address, config)
        stream = channel.stream_stream(f"/{_SERVICE}/Stream")
        unary = channel.unary_unary(f"/{_SERVICE}/Unary")
        unary(b"x", timeout=10)  # connect once before timing
        payload = os.urandom(_BIG)
        started = time.perf_counter()
        acks = list(stream(iter([payload] * big), timeout=120))
        stream_s = time.perf_counter() - started
        assert len(acks) == big
        small_payload = os.urandom(_SMALL)
        rtts = []
        for _ in range(small):
            started = time.perf_counter()
            unary(small_payload, timeout=10)
            rtts.append(time.perf_counter() - started)
        channel.close()
        first_calls = []
        for _ in range(handshakes):
            fresh = make_channel(address, config)
            started = time.perf_counter()
            fresh.unary_unary(f"/{_SERVICE}/Unary")(b"x", timeout=10)
            first_calls.append(time.perf_counter() - started)
            fresh.close()
    finally:
        server.stop(0)
    return {
        "stream_mib_per_s": big * _BIG / stream_s / (1 << 20),
        "unary_4kib_rtt_p50_us": statistics.median(rtts) * 1e6,
        "unary_4kib_rtt_p99_us": sorted(rtts)[int(0.99 * (len(rtts) - 1))] * 1e6,
        "first_call_p50_ms": statistics.median(first_calls) * 1e3,
    }


def transport_part(rounds: int, big: int, small: int, handshakes: int) -> dict[str, Any]:
    configs = {
        "plaintext": TransportConfig(),
        "tls": TransportConfig(security=SwarmCredentials.from_key(generate_swarm_key())),
    }
    samples: dict[str, list[dict]] = {name: [] for name in configs}
    for index in range(rounds):
        for name, config in configs.items():
            samples[name].append(_transport_round(config, big, small, handshakes))
            logger.info("transport round %d %s: %s", index, name, samples[name][-1])
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    plain, tls = medians["plaintext"], medians["tls"]
    return {
        "messages": {"stream_1mib": big, "unary_4kib": small, "new_channels": handshakes},
        "rounds": samples,
        "median": medians,
        "tls_vs_plaintext": {
            "stream_throughput": tls["stream_mib_per_s"] / plain["stream_mib_per_s"],
            "unary_rtt_p50_extra_us": tls["unary_4kib_rtt_p50_us"] - plain["unary_4kib_rtt_p50_us"],
            "first_call_extra_ms": tls["first_call_p50_ms"] - plain["first_call_p50_ms"],
        },
    }


# -- serving --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsServingConfig(BenchConfig):
    """The weak-link deployment; modes named ``*-key`` get the swarm key from a file."""

    key_file: str = ""

    def engine_flags(self, mode: Mode) -> list[str]:
        flags = super().engine_flags(mode)
        if mode.name.endswith("-key"):
            flags += ["--molink-swarm-key-file", self.key_file]
        return flags


SERVING_MODES = (
    Mode("loopback-open", 0, "on", shaped=False),
    Mode("loopback-key", 0, "on", shaped=False),
    Mode("link-open", 0, "on"),
    Mode("link-key", 0, "on"),
)


def _serving_order(rounds: int) -> list[tuple[int, Mode]]:
    """Open and key runs alternate, in reversed order every other round (ABBA), so that a
    drift of the machine's load does not favour either."""
    order = []
    for index in range(rounds):
        for pair in (SERVING_MODES[:2], SERVING_MODES[2:]):
            order += [(index, mode) for mode in (pair if index % 2 == 0 else pair[::-1])]
    return order


def _serving_summary(results: dict[str, list[dict]]) -> dict[str, Any]:
    summary = {}
    for where in ("loopback", "link"):
        runs = {
            side: [r["runs"]["saturating"]["summary"] for r in results.get(f"{where}-{side}", [])]
            for side in ("open", "key")
        }
        if not runs["open"] or not runs["key"]:
            continue
        figures = {
            f"{name}_{side}": statistics.mean(s[name] for s in runs[side])
            for name in ("output_throughput", "tpot_p50_ms", "tpot_p99_ms")
            for side in ("open", "key")
        }
        figures["throughput_key_vs_open"] = (
            figures["output_throughput_key"] / figures["output_throughput_open"]
        )
        figures["rounds"] = min(len(runs["open"]), len(runs["key"]))
        summary[where] = figures
    return summary


def serving_part(requests: int, rate: float, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        key_file = Path(folder) / "swarm.key"
        key_file.write_text(generate_swarm_key().text() + "\n")
        config = TlsServingConfig(
            rates=(Rate("saturating", rate, requests),),
            prompt_lengths=(32, 512),
            output_lengths=(32, 128),
            key_file=str(key_file),
        )
        results: dict[str, list[dict]] = {}
        errors: list[str] = []
        for index, mode in _serving_order(rounds):
            try:
                with deployed(mode, config) as deployment:
                    measured = asyncio.run(measure(deployment, config))
                measured["round"] = index
                measured["commands"] = [
                    c.replace(str(key_file), "SWARM_KEY_FILE") for c in measured["commands"]
                ]
                results.setdefault(mode.name, []).append(measured)
            except Exception as exc:  # a failed mode is reported; the others still run
                logger.exception("mode %s failed", mode.name)
                errors.append(f"{mode.name}: {type(exc).__name__}: {exc}")
    return {
        "link": config.link().describe(),
        "load": {
            "requests": requests,
            "rate_per_s": rate,
            "prompts": list(config.prompt_lengths),
            "outputs": list(config.output_lengths),
        },
        "modes": results,
        "summary": _serving_summary(results),
        "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="transport,pipeline,serving")
    parser.add_argument("--decode-steps", type=int, default=100)
    parser.add_argument("--prefill-steps", type=int, default=20)
    parser.add_argument("--rate-mbit", type=float, default=100.0)
    parser.add_argument("--rtt-ms", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=3, help="transport rounds per side")
    parser.add_argument("--big-messages", type=int, default=200)
    parser.add_argument("--small-messages", type=int, default=1000)
    parser.add_argument("--handshakes", type=int, default=20)
    parser.add_argument("--requests", type=int, default=12, help="serving requests per mode")
    parser.add_argument("--rate", type=float, default=2.0, help="serving requests/s")
    parser.add_argument("--serving-rounds", type=int, default=2)
    parser.add_argument("--name", default="tls")
    args = parser.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    payload: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv])}
    if "transport" in parts:
        payload["transport"] = transport_part(
            args.rounds, args.big_messages, args.small_messages, args.handshakes
        )
        logger.info("transport: %s", payload["transport"]["tls_vs_plaintext"])
    if "pipeline" in parts:
        payload["pipeline"] = pipeline_part(
            args.rounds, args.decode_steps, args.prefill_steps, args.rate_mbit, args.rtt_ms
        )
        logger.info("pipeline: %s", payload["pipeline"]["key_vs_open"])
    if "serving" in parts:
        payload["serving"] = serving_part(args.requests, args.rate, args.serving_rounds)
        logger.info("serving: %s", payload["serving"]["summary"])
    write_results(args.name, payload)
    return 1 if payload.get("serving", {}).get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
