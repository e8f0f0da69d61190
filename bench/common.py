"""Helpers every benchmark shares: server subprocesses, /metrics, machine info, results files.

Servers listen on 127.0.0.1 only and are always stopped (SIGTERM, then SIGKILL) when the
``running_server`` block ends, whatever happens inside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from molink.loadgen.stats import mean, percentile  # noqa: E402  (re-exported for benchmarks)
from tests.helpers.server_process import free_port  # noqa: E402  (re-exported for benchmarks)

if TYPE_CHECKING:
    from molink.engine.offline import LLM

__all__ = [
    "LOOPBACK",
    "quantized_default_model",
    "REPO_ROOT",
    "RESULTS_DIR",
    "ServerProcess",
    "fetch_metrics",
    "free_port",
    "machine_info",
    "mean",
    "metric_total",
    "metrics_delta",
    "molink_serve_command",
    "parse_prometheus_text",
    "percentile",
    "running_server",
    "start_server",
    "stop_server",
    "wait_for_health",
    "write_results",
]

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
_HEALTH_POLL_S = 0.5
_LOG_TAIL_CHARS = 4000


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, num_chars: int = _LOG_TAIL_CHARS) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-num_chars:]
        except OSError:
            return ""


def quantized_default_model(kernel: str = "int4", max_num_seqs: int = 8) -> LLM:
    """The default model's GGUF kept quantized in the offline engine with a 256 MiB KV cache:
    the setup of the benches that time its decode steps in one process. Imported here, not
    at the top: most benches drive servers and need no engine in their own process."""
    from molink.engine.offline import LLM
    from molink.weights import default_model_gguf

    return LLM(
        model=str(default_model_gguf()),
        quantization="gguf",
        quantized_batch_kernel=kernel,
        max_num_seqs=max_num_seqs,
        kv_cache_memory_bytes=1 << 28,
    )


def molink_serve_command(port: int, args: Sequence[str] = ()) -> list[str]:
    """``molink serve`` on loopback, run with this interpreter so the venv's package is used."""
    serve = [sys.executable, "-m", "molink.cli.main", "serve"]
    return [*serve, "--host", LOOPBACK, "--port", str(port), *args]


def start_server(
    command: Sequence[str], port: int, env: Mapping[str, str] | None = None
) -> ServerProcess:
    """Starts ``command`` (which must listen on ``port``) with its output in a log file."""
    log_file = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    logger.info("starting: %s (log %s)", " ".join(command), log_file.name)
    process = subprocess.Popen(
        list(command),
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    log_file.close()
    return ServerProcess(process, port, Path(log_file.name))


def wait_for_health(server: ServerProcess, timeout_s: float, path: str = "/health") -> float:
    """Polls ``path`` until it answers 200; returns the seconds it took. Raises if the process
    exits or the time runs out, with the end of its log in the message."""
    started = time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with status {server.process.returncode}:\n{server.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{server.base_url}{path}", timeout=2.0, trust_env=False)
            if response.status_code == 200:
                return time.monotonic() - started
        time.sleep(_HEALTH_POLL_S)
    raise TimeoutError(f"server not healthy after {timeout_s:.0f}s:\n{server.log_tail()}")


def stop_server(server: ServerProcess, timeout_s: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL if it has not exited in time. Returns the exit status."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning(
                "server %d ignored SIGTERM for %.0fs; killing it", process.pid, timeout_s
            )
            process.kill()
    try:
        return process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.error("server %d did not exit after SIGKILL", process.pid)
        return None


@contextlib.contextmanager
def running_server(
    command: Sequence[str],
    port: int,
    startup_timeout_s: float = 600.0,
    env: Mapping[str, str] | None = None,
    health_path: str = "/health",
) -> Iterator[ServerProcess]:
    """A healthy server for the block (``health_path`` answers 200), stopped at its end."""
    server = start_server(command, port, env)
    try:
        took = wait_for_health(server, startup_timeout_s, health_path)
        logger.info("server healthy after %.1fs", took)
        yield server
    finally:
        status = stop_server(server)
        logger.info("server stopped (status %s); log at %s", status, server.log_path)


# One sample line: name, optional {labels}, value, optional timestamp.
_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def series_key(name: str, labels: Mapping[str, str]) -> str:
    """``name{a="x",b="y"}`` with labels sorted, or ``name`` alone without labels."""
    if not labels:
        return name
    inner = ",".join(f'{key}="{labels[key]}"' for key in sorted(labels))
    return f"{name}{{{inner}}}"


def parse_prometheus_text(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {series key: value}; comments and bad lines are skipped."""
    metrics: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            logger.debug("skipping metrics line %r", line)
            continue
        labels = dict(_LABEL.findall(match.group("labels") or ""))
        try:
            value = float(match.group("value"))
        except ValueError:
            continue
        metrics[series_key(match.group("name"), labels)] = value
    return metrics


def fetch_metrics(base_url: str, timeout_s: float = 10.0) -> dict[str, float]:
    response = httpx.get(f"{base_url}/metrics", timeout=timeout_s, trust_env=False)
    response.raise_for_status()
    return parse_prometheus_text(response.text)


def metric_total(metrics: Mapping[str, float], name: str) -> float:
    """The sum of ``name`` over all its label sets (0.0 when absent)."""
    return sum(v for key, v in metrics.items() if key == name or key.startswith(name + "{"))


def metrics_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """How counters moved during a run: ``_total``, ``_sum`` and ``_count`` series only (gauges
    and histogram buckets say little as a difference)."""
    delta = {}
    for key, value in after.items():
        name = key.split("{", 1)[0]
        if name.endswith(("_total", "_sum", "_count")):
            delta[key] = value - before.get(key, 0.0)
    return delta


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def _torch_info() -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        return {"torch_version": None, "torch_threads": None, "cuda_device": None}
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_device": cuda,
    }


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare results across machines."""
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity) if affinity is not None else None,
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **_torch_info(),
    }


def write_results(name: str, payload: Mapping[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Writes ``{"benchmark": name, "machine": ..., **payload}`` to ``results_dir/name.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    document = {"benchmark": name, "machine": machine_info(), **payload}
    path.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", path)
    return path
