"""Where ``molink serve``'s resident memory goes on a quantized single node, phase by phase.

Two measurements of SmolLM2-135M Q4_1 (one thread, KV cache as llama.cpp's server holds it:
``--kv-cache-dtype bfloat16 --kv-cache-memory 189MiB``):

``server``: ``molink serve`` with those flags in its own process; once /health answers,
VmRSS/VmHWM and /proc/<pid>/smaps_rollup idle, then after a few greedy requests (four
prompts one at a time, then eight at once, 32 tokens each). The greedy texts are kept in
the results so that a change meant to save memory can be checked to change no output.

``phases``: the same engine built step by step in this process (``--phases``, run in a
fresh interpreter), VmRSS and VmHWM after each: Python alone, each import of the serve path
(torch, tokenizers, fastapi/uvicorn, then the rest of the serve path, and whether gRPC, the
TLS stack, transformers or hivemind came along),
the engine's phases (weights loaded, KV cache and grammar compiler, tokenizer), the engine
built, the load-time frees returned, and the first request. ``phases_first_start``: the
same with an empty cache (the file's first start: parsed, packed and cached, its tokenizer
converted through transformers).

``--llama-server BINARY``: llama.cpp's server on the same file measured the same way in the
same run (one thread, ``-c 8192``: 189 MB of f16 KV).

    python bench/quant_memory_phases.py [--name quant_memory_phases] [--llama-server BIN]

Writes ``bench/results/<name>.json`` with the load average before and after.
``quant_memory_phases_joined_head.json``: after two-plane matrices are cached joined
(mapped, not copied at load): peak 420.8 MiB against llama-server's 325.0 (1.29x; 445.7
and 1.37x in ``quant_memory_phases_lazy_kv.json`` before), idle 313.5 (357.2), the 12
greedy texts equal to that run's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import free_port, molink_serve_command, running_server, write_results  # noqa: E402

logger = logging.getLogger("quant_memory_phases")

KV_FLAGS = ["--kv-cache-dtype", "bfloat16", "--kv-cache-memory", "189MiB"]
LLAMA_SERVER_PEAK_MIB = 325.0  # llama-server's VmHWM on the same file and KV size
PROMPTS = (
    "The capital of France is",
    "Write a haiku about memory:",
    "def fibonacci(n):",
    "Three facts about the moon:",
)
NEW_TOKENS = 32
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int | str = "self") -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in STATUS_KEYS:
            out[key] = round(int(line.split()[1]) / 1024, 1)
    return out


def smaps_rollup(pid: int | str = "self") -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 3 and fields[2] == "kB":
            out[fields[0].rstrip(":")] = round(int(fields[1]) / 1024, 1)
    return out


def serve_flags() -> list[str]:
    from molink.weights import default_model_gguf

    gguf = str(default_model_gguf())
    return ["--model", gguf, "--quantization", "gguf", "--num-threads", "1", *KV_FLAGS]


async def greedy_texts(base_url: str) -> list[str]:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=600.0, trust_env=False) as client:

        async def one(prompt: str) -> str:
            body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0.0}
            response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return str(response.json()["choices"][0]["text"])

        texts = [await one(p) for p in PROMPTS]
        texts += await asyncio.gather(*(one(f"{PROMPTS[i % 4]} ({i})") for i in range(8)))
    return texts


def llama_server_command(binary: str, port: int) -> list[str]:
    """llama.cpp's server on the same file, one thread, 8,192 tokens of f16 KV (the 189 MB
    molink's flags give: 30 layers x 3 KV heads x 64 x 2 x 2 bytes per token)."""
    from molink.weights import default_model_gguf

    gguf = str(default_model_gguf())
    return [binary, "-m", gguf, "-t", "1", "-c", "8192", "--host", "127.0.0.1", "--port", str(port)]


def measure_server(llama_server: str | None = None) -> dict[str, Any]:
    port = free_port()
    env = {"OMP_NUM_THREADS": "1"}
    if llama_server is not None:
        command = llama_server_command(llama_server, port)
    else:
        command = molink_serve_command(port, serve_flags())
    with running_server(command, port, env=env) as server:
        pid = server.process.pid
        idle = {**proc_status(pid), "smaps_rollup": smaps_rollup(pid)}
        texts = asyncio.run(greedy_texts(server.base_url))
        served = {**proc_status(pid), "smaps_rollup": smaps_rollup(pid)}
        modules = sorted(
            {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()}
        )
    return {
        "command": command,
        "idle": idle,
        "after_requests": served,
        "peak_over_llama_server": round(served["VmHWM"] / LLAMA_SERVER_PEAK_MIB, 2),
        "mapped_files": [m for m in modules if m.startswith("/") and ".so" in m],
        "greedy_texts": texts,
    }


# --- phases, in a fresh interpreter -----------------------------------------------------


def _phase(log: list[dict[str, Any]], name: str) -> None:
    mods = sys.modules
    log.append(
        {
            "phase": name,
            **proc_status(),
            "transformers": "transformers" in mods,
            "hivemind": "hivemind" in mods,
            "grpc": "grpc" in mods,
            "cryptography": "cryptography.x509" in mods,
        }
    )


def _wrap(log: list[dict[str, Any]], owner: Any, attr: str, name: str) -> None:
    original = getattr(owner, attr)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        _phase(log, name)
        return result

    setattr(owner, attr, wrapped)


def run_phases() -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = []
    _phase(log, "python")
    for module in ("torch", "tokenizers", "fastapi", "uvicorn"):
        __import__(module)
        _phase(log, f"import {module}")
    import molink.cli.serve as serve

    _phase(log, "import molink.cli.serve (rest of the serve path)")
    from molink.cli.args import EngineArgs, add_engine_args
    from molink.cli.engine_builder import build_engine_client
    from molink.engine import factory

    _phase(log, "import molink.cli.engine_builder")
    _wrap(log, factory, "load_stage_slice", "weights loaded")
    _wrap(log, factory, "StageWorker", "KV cache allocated, grammar compiler built")
    _wrap(log, factory.Tokenizer, "from_dir", "a tokenizer loaded")
    parser = add_engine_args(argparse.ArgumentParser())
    args = EngineArgs.from_namespace(parser.parse_args(serve_flags()))
    serve.apply_thread_count(args)

    async def build_and_generate() -> None:
        engine = build_engine_client(args)
        _phase(log, "engine built")
        serve.return_freed_memory()
        _phase(log, "load-time frees returned")
        from molink.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)
        async for _ in engine.generate("phase-0", PROMPTS[0], params):
            pass
        _phase(log, "first request")
        engine.shutdown()

    asyncio.run(build_and_generate())
    return log


def measure_phases(cache_dir: str | None = None) -> list[dict[str, Any]]:
    """``cache_dir``: an empty MOLINK_CACHE_DIR, for a first start (GGUF parsed and packed,
    tokenizer converted through transformers); None: the warm cache a server restarts with."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if cache_dir is not None:
        env["MOLINK_CACHE_DIR"] = cache_dir
    text = subprocess.run(
        [sys.executable, __file__, "--phases"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        env=env,
    ).stdout
    return json.loads(text.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="quant_memory_phases")
    parser.add_argument("--phases", action="store_true", help="(internal) print the phases")
    parser.add_argument("--llama-server", help="llama.cpp's llama-server binary, measured too")
    args = parser.parse_args()
    if args.phases:
        print(json.dumps(run_phases()))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results: dict[str, Any] = {"load_average_before": os.getloadavg()}
    results["llama_server_peak_mib"] = LLAMA_SERVER_PEAK_MIB
    results["server"] = measure_server()
    if args.llama_server:
        results["llama_server"] = measure_server(args.llama_server)
    results["phases"] = measure_phases()
    with tempfile.TemporaryDirectory(prefix="molink-cold-") as cold:
        results["phases_first_start"] = measure_phases(cold)
    results["load_average_after"] = os.getloadavg()
    write_results(args.name, results)
    logger.info("%s", json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
