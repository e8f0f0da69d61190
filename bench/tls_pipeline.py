"""Part of ``bench/tls_bench.py``: a two-stage pipeline of arithmetic stages (no model, so
that compute does not drown the wire) in this process, head -> stage -> head, without and
with the swarm key, on loopback and through the link emulator (both hops shaped). Steps
are sent one at a time: decode-sized steps (32 rows) give the round trip, prefill-sized
ones (512 rows) the transfer rate. Widths and dtype are SmolLM2's (576, float32)."""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Any

from bench.common import LOOPBACK, free_port
from molink.config import LayerRange
from molink.netem import LinkEmulator, LinkSpec
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.sampling_params import SamplingParams
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig

logger = logging.getLogger("tls_bench")

MODEL = toy_identity(4, hidden_size=576)
DECODE_ROWS = 32
PREFILL_ROWS = 512
KEY = generate_swarm_key()


def _plan(step_id: int, rows: int) -> StepPlan:
    """``rows`` one-token sequences (decode-sized) or one sequence of ``rows`` tokens."""
    if rows == DECODE_ROWS:
        seqs = [(seq_id, (7,)) for seq_id in range(rows)]
    else:
        seqs = [(0, tuple(range(1, rows + 1)))]
    return StepPlan(
        step_id=step_id,
        scheduled=tuple(ScheduledSequence(s, 0, len(t), (0,), True) for s, t in seqs),
        token_ids=tuple(token for _, tokens in seqs for token in tokens),
        new_sequences=tuple(NewSequenceData(s, t, len(t), SamplingParams()) for s, t in seqs),
    )


def _config(secure: bool) -> TransportConfig:
    security = SwarmCredentials.from_key(KEY) if secure else None
    return TransportConfig(step_timeout_s=60.0, security=security)


def _node_id(config: TransportConfig, name: str) -> str:
    return config.security.node_id if config.security else name


def _run_steps(head: PipelineExecutor, rows: int, count: int, first_id: int) -> list[float]:
    times = []
    for index in range(count):
        started = time.perf_counter()
        head.submit(_plan(first_id + index, rows))
        results: list = []
        while not results:
            results = head.poll(1.0)
        assert results[0].error is None, results[0].error
        times.append(time.perf_counter() - started)
    return times


def _one_round(secure: bool, link: LinkSpec | None, decode: int, prefill: int) -> dict:
    ports = {"head": free_port(), "stage": free_port()}
    emulators: dict[str, LinkEmulator] = {}
    advertised = dict(ports)
    if link is not None:
        for name in ports:
            emulators[name] = LinkEmulator(LOOPBACK, 0, LOOPBACK, ports[name], up=link).start()
            advertised[name] = emulators[name].port
    head_config, stage_config = _config(secure), _config(secure)
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 2), MODEL),
        NodeInfo(_node_id(head_config, "head"), MODEL, LayerRange(0, 2),
                 f"{LOOPBACK}:{advertised['head']}", wire_dtype="float32"),
        head_config,
        bind_address=f"{LOOPBACK}:{ports['head']}",
    ).start()  # fmt: skip
    stage = StageNode(
        ToyStageExecutor(LayerRange(2, 4), MODEL),
        NodeInfo(_node_id(stage_config, "stage"), MODEL, LayerRange(2, 4),
                 f"{LOOPBACK}:{advertised['stage']}", wire_dtype="float32"),
        stage_config,
        bind_address=f"{LOOPBACK}:{ports['stage']}",
        initial_peer=f"{LOOPBACK}:{ports['head']}",
    )  # fmt: skip
    try:
        stage.start()
        _run_steps(head, DECODE_ROWS, 3, 1)  # connect and warm up
        decode_s = _run_steps(head, DECODE_ROWS, decode, 100)
        prefill_s = _run_steps(head, PREFILL_ROWS, prefill, 100_000)
    finally:
        stage.stop()
        head.close()
        for emulator in emulators.values():
            emulator.stop()
    prefill_bytes = PREFILL_ROWS * MODEL.hidden_size * 4
    return {
        "decode_step_p50_ms": statistics.median(decode_s) * 1e3,
        "decode_step_p99_ms": sorted(decode_s)[int(0.99 * (len(decode_s) - 1))] * 1e3,
        "prefill_step_p50_ms": statistics.median(prefill_s) * 1e3,
        "prefill_mib_per_s": prefill_bytes / statistics.median(prefill_s) / (1 << 20),
    }


def pipeline_part(rounds: int, decode: int, prefill: int, rate_mbit: float, rtt_ms: float):
    links = {"loopback": None, "link": LinkSpec.from_rtt(rate_mbit, rtt_ms)}
    samples: dict[str, list[dict]] = {}
    for index in range(rounds):
        for where, link in links.items():
            for secure in (False, True):
                name = f"{where}-{'key' if secure else 'open'}"
                samples.setdefault(name, []).append(_one_round(secure, link, decode, prefill))
                logger.info("pipeline round %d %s: %s", index, name, samples[name][-1])
    medians = {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in samples.items()
    }
    comparison: dict[str, Any] = {}
    for where in links:
        plain, tls = medians[f"{where}-open"], medians[f"{where}-key"]
        comparison[where] = {
            "decode_step_p50_extra_ms": tls["decode_step_p50_ms"] - plain["decode_step_p50_ms"],
            "prefill_rate_key_vs_open": tls["prefill_mib_per_s"] / plain["prefill_mib_per_s"],
        }
    return {
        "link": dataclasses.asdict(links["link"]),
        "rows": {"decode": DECODE_ROWS, "prefill": PREFILL_ROWS, "hidden": 576, "dtype": "float32"},
        "steps": {"decode": decode, "prefill": prefill},
        "rounds": samples,
        "median": medians,
        "key_vs_open": comparison,
    }
