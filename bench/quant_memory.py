"""Where a quantized server's resident memory goes, against llama.cpp's server on the file.

SmolLM2-135M Q4_1 served by ``molink serve --quantization gguf`` (one thread) in several
variants, each in its own process, side by side in one run. For each: resident memory
(VmRSS) once loaded and idle, after the serving bench's workload (1, 8 and 32 streams of
32 new tokens, molink's quant_serving.measure) and its peak (VmHWM), split by mapping
(anonymous memory, the heap, libtorch, other files) from /proc/<pid>/smaps, and the
tok/s of each stream count so that a variant that saves memory by slowing steps shows.

Then the floor no server setting moves, each measured in a fresh interpreter: Python
alone, ``import torch``, and the modules ``molink serve`` imports before it loads a model.

Variants (``--variants``, comma-separated):
    default        no memory flags: the 512 MiB float32 KV reserve (11,648 tokens).
    like_llama     KV as llama.cpp's server holds it in quant_serving_llama_cpp.json:
                   4,096 tokens (``--n_ctx 4096``) of 16-bit keys/values
                   (``--kv-cache-dtype bfloat16 --kv-cache-memory`` that many bytes).
    like_llama_f32 the same 4,096 tokens of float32 keys/values (what the bfloat16 cache
                   would cost in step time, if anything, shows against this one).
    ..._env        the same with ``MALLOC_ARENA_MAX=2`` in the environment (compares the
                   allocator settings the server applies itself with glibc's defaults).

    python bench/quant_memory.py [--variants default,like_llama] [--name quant_memory]

Writes ``bench/results/<name>.json`` after each variant, with ``breakdown_mib`` per variant.

Committed runs (a 2-core host loaded by other jobs; memory figures do not depend on the
load, tok/s do): ``quant_memory_before.json`` before the server returned what building the
engine freed, ``quant_memory.json`` after (``malloc_trim`` once, molink.quant.memory):
like_llama peak 650 -> 628 MiB (llama.cpp 327: 1.99x -> 1.92x), resident after the
workload 622 -> 617; default 1068 -> 1048. ``MALLOC_ARENA_MAX=2`` changed nothing
(647 MiB). Breakdown of like_llama's 617 MiB: Python and torch 276, the serve path's other
imports 74, library code touched while serving 35, weights 97 (memory-mapped packed
cache), KV cache 90, the rest (tokenizer, grammar compiler, activations, free lists) 45.
torch, weights and KV alone are 463 MiB, above llama.cpp's 1.5x (490) less the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import free_port, molink_serve_command, running_server, write_results  # noqa: E402
from bench.quant_serving import measure  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("quant_memory")

# SmolLM2-135M: 30 layers x 3 KV heads x 64 dims, keys and values.
KV_BYTES_PER_TOKEN_16BIT = 2 * 30 * 3 * 64 * 2
LLAMA_CPP_CONTEXT = 4096  # --n_ctx of the llama.cpp server in quant_serving_llama_cpp.json
LLAMA_CPP_PEAK_MIB = 327.1  # its VmHWM there, same file, same workload
STREAMS = (1, 8, 32)
NEW_TOKENS = 32

_KV_16 = str(KV_BYTES_PER_TOKEN_16BIT * LLAMA_CPP_CONTEXT)
_KV_32 = str(KV_BYTES_PER_TOKEN_16BIT * 2 * LLAMA_CPP_CONTEXT)
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "like_llama": ["--kv-cache-dtype", "bfloat16", "--kv-cache-memory", _KV_16],
    "like_llama_f32": ["--kv-cache-dtype", "float32", "--kv-cache-memory", _KV_32],
}


def proc_status(pid: int) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            value = int(line.split()[1])
            out[key] = value if key == "Threads" else round(value / 1024, 1)
    return out


def smaps_split(pid: int) -> dict[str, float]:
    """Resident MiB by kind of mapping: anonymous, heap, libtorch, the weights' files, the
    rest of the files (other libraries)."""
    split: Counter[str] = Counter()
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            fields = line.split()
            path = fields[5] if len(fields) > 5 else ""
            if not path:
                kind = "anon"
            elif path == "[heap]":
                kind = "heap"
            elif "libtorch" in path:
                kind = "libtorch"
            elif "/molink/packed/" in path or path.endswith(".gguf"):
                kind = "weight_files"
            elif path.startswith("["):
                kind = "anon"
            else:
                kind = "other_files"
        elif line.startswith("Rss:"):
            split[kind] += int(line.split()[1])
    return {k: round(v / 1024, 1) for k, v in sorted(split.items())}


def snapshot(pid: int) -> dict[str, Any]:
    return {**proc_status(pid), "by_mapping_mib": smaps_split(pid)}


def resident_metrics(base_url: str) -> dict[str, int]:
    import httpx

    text = httpx.get(f"{base_url}/metrics", timeout=10.0, trust_env=False).text
    found = {}
    for kind in ("weights", "kv_cache"):
        match = re.search(rf"^molink:resident_{kind}_bytes (\d+)", text, re.M)
        if match:
            found[f"{kind}_mib"] = round(int(match.group(1)) / 2**20, 1)
    return found


def run_variant(name: str) -> dict[str, Any]:
    base = name.removesuffix("_env")
    gguf = str(default_model_gguf())
    flags = ["--model", gguf, "--quantization", "gguf", "--num-threads", "1"]
    flags += ["--max-num-seqs", "64", *VARIANTS[base]]
    env = {"OMP_NUM_THREADS": "1"}
    if name.endswith("_env"):
        env["MALLOC_ARENA_MAX"] = "2"
    port = free_port()
    with running_server(molink_serve_command(port, flags), port, env=env) as server:
        pid = server.process.pid
        loaded = snapshot(pid)
        accounted = resident_metrics(server.base_url)
        asyncio.run(measure(server.base_url, 1, 4))  # lazy initialisation
        runs = [asyncio.run(measure(server.base_url, n, NEW_TOKENS)) for n in STREAMS]
        served = snapshot(pid)
    return {
        "flags": VARIANTS[base],
        "env": {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"},
        "loaded_idle": loaded,
        "after_workload": served,
        "accounted": accounted,
        "peak_over_llama_cpp": round(served["VmHWM"] / LLAMA_CPP_PEAK_MIB, 2),
        "tok_s": {str(r["streams"]): r["output_tok_s"] for r in runs},
        "tpot_ms": {str(r["streams"]): round(r["tpot_mean_ms"], 1) for r in runs},
    }


_FLOOR_SCRIPT = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
for line in open('/proc/self/status'):
    if line.startswith(('VmRSS', 'RssAnon', 'RssFile')):
        print(line.split(':')[0], int(line.split()[1]))
"""

FLOORS = {
    "python": [],
    "torch": ["torch"],
    "torch_and_serve_imports": ["torch", "molink.cli.serve", "molink.engine.factory"],
    "torch_and_http_stack": ["torch", "fastapi", "uvicorn", "pydantic", "prometheus_client"],
    "torch_and_pipeline": ["torch", "molink.pipeline"],
}


def floors() -> dict[str, dict[str, float]]:
    out = {}
    for name, modules in FLOORS.items():
        text = subprocess.run(
            [sys.executable, "-c", _FLOOR_SCRIPT, *modules],
            capture_output=True,
            text=True,
            check=True,
            cwd=REPO_ROOT,
        ).stdout
        out[name] = {
            line.split()[0]: round(int(line.split()[1]) / 1024, 1) for line in text.splitlines()
        }
    return out


def breakdown(floors_mib: dict[str, Any], variant: dict[str, Any]) -> dict[str, float]:
    """A variant's resident MiB after the workload, by where it goes: the interpreter and
    torch, the serve path's other imports, library code touched while serving, the weights
    and KV cache the server accounts for (/metrics), and the rest (tokenizer, grammar
    compiler, activations, allocator free lists)."""
    torch_rss = floors_mib["torch"]["VmRSS"]
    imports = floors_mib["torch_and_serve_imports"]
    after = variant["after_workload"]
    split = after["by_mapping_mib"]
    code = split["libtorch"] + split["other_files"] - imports["RssFile"]
    weights = variant["accounted"]["weights_mib"]
    kv = variant["accounted"]["kv_cache_mib"]
    anon = split["anon"] + split["heap"]
    return {
        "python_and_torch": torch_rss,
        "serve_imports": round(imports["VmRSS"] - torch_rss, 1),
        "code_touched_serving": round(code, 1),
        "weights": weights,
        "kv_cache": kv,
        "rest": round(anon - imports["RssAnon"] - kv, 1),
        "resident_after": after["VmRSS"],
        "peak": after["VmHWM"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="default,like_llama,like_llama_f32")
    parser.add_argument("--name", default="quant_memory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results: dict[str, Any] = {
        "workload": {"streams": list(STREAMS), "new_tokens": NEW_TOKENS, "prompt": "text"},
        "llama_cpp": {
            "context_tokens": LLAMA_CPP_CONTEXT,
            "kv": "f16",
            "peak_mib": LLAMA_CPP_PEAK_MIB,
        },
        "floors_mib": floors(),
        "variants": {},
    }
    for name in args.variants.split(","):
        results["variants"][name] = run_variant(name)
        results["variants"][name]["breakdown_mib"] = breakdown(
            results["floors_mib"], results["variants"][name]
        )
        logger.info("%s: %s", name, results["variants"][name])
        write_results(args.name, results)


if __name__ == "__main__":
    main()
