"""SmolLM2-135M Q4_1 served quantized against float32, bfloat16 and llama.cpp, in one run.

Each server gets one compute thread (``--num-threads 1``; llama.cpp ``--n_threads 1``) on
this 2-core machine and serves the same GGUF file. For 1, 8 and 32 concurrent streams
(all sent at once, a text prompt, 64 new tokens, greedy, ``ignore_eos`` where the server
honours it) it records output tok/s, TTFT and TPOT from the streamed answers, and each
server's peak resident memory (VmHWM) after the runs. ``--rounds N`` repeats the servers
in ABBA order and keeps, per stream count, the round with the median tok/s.

llama.cpp runs two ways. ``llama_server``: its own C++ server (``--llama-server
/path/to/llama-server``), built from the llama.cpp source that llama-cpp-python's sdist
vendors (``pip download --no-binary :all: llama-cpp-python``, then in
``vendor/llama.cpp``: ``cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF`` and ``cmake
--build build --target llama-server``; ~10 minutes on 2 cores), with 32 slots and
continuous batching, one thread. ``llama_cpp``: llama-cpp-python's server (``python -m
llama_cpp.server``), built by ``pip install 'llama-cpp-python[server]'`` into its own
virtualenv (it pins its own numpy/fastapi; ``--llama-python``), which answers one request
at a time (no batching across requests).

    python bench/quant_serving.py [--llama-server /path/to/llama-server]
        [--llama-python /path/to/venv/bin/python]
        [--servers molink_q4_1,molink_float32] [--streams 1,8,32] [--new-tokens 32]
        [--name quant_serving]

Writes ``bench/results/<name>.json`` (after each server, so a long run keeps what it
measured). ``--prompt-tokens N`` sends prompts of N token ids instead (long contexts; the
molink servers get a 2 GiB KV cache) and ``decode_tok_s`` is the streams' steady decode
rate (streams x 1000 / TPOT). Committed runs (a host loaded by other jobs, so absolute
figures are low and noisy; each file compares its servers in one run):
``quant_serving.json``: Q4_1 vs float32 at 1, 8, 32 streams, 32 new tokens (2.95x, 1.68x,
0.89x); ``quant_serving_bf16.json``: Q4_1 vs bfloat16 at 1 and 8 streams;
``quant_serving_kernels.json``: Q4_1 (int4), Q4_1 with ``--quantized-batch-kernel fp16``
and float32 at 1, 8, 32 streams on a host loaded ~7x (load average 13-16 on 2 cores):
int4 0.84x, 0.72x, 0.45x float32; fp16 0.81x, 1.15x, 0.78x (bfloat16 was stopped: its
warm-up request alone outlasted the time left); ``quant_serving_int8act.json`` (load
13-14, 32 new tokens): tok/s at 1, 8, 32 streams: float32 2.66, 7.2, 13.77 (peak RSS
2152 MiB); Q4_1 int4 2.61, 7.86, 8.22 (0.98x, 1.09x, 0.60x; 985 MiB); fp16 3.36, 13.35,
13.69 (1.26x, 1.85x, 0.99x; 1397 MiB); int8act 3.0, 8.9, 16.02 (1.13x, 1.24x, 1.16x;
1501 MiB). ``quant_serving_llama_cpp.json``: llama-cpp-python 0.3.36's server built here,
run right after on the same loaded host (end tokens forbidden by ``logit_bias``, requests
queued instead of interrupted): 7.81, 4.9, 4.69 tok/s (TPOT 129, 116, 114 ms: one request
at a time, the others wait: TTFT 24 s at 8, 107 s at 32), peak RSS 327 MiB. Against it:
int4 0.33x, 1.6x, 1.75x; fp16 0.43x, 2.7x, 2.9x; int8act 0.38x, 1.8x, 3.4x.
Those runs were on an AVX2 CPU (no AVX-512). ``quant_serving_avx512bf16.json``: an AMD EPYC
with AVX-512 and ``avx512_bf16`` (faster int4 and bfloat16 paths), 4 ABBA rounds, 64 new
tokens, load 3.6-6.5: tok/s at 1, 8, 32 streams float32 20.2, 98.7, 149.7; bfloat16 15.7,
82.7, 249.7; int4 37.8, 118.9, 116.5 (1.87x, 1.20x, 0.78x float32); fp16 53.4, 147.8,
260.6 (2.64x, 1.50x, 1.74x); int8act 42.2, 134.7, 183.5 (2.08x, 1.36x, 1.23x).
``quant_serving_avx512bf16_run2.json``: the same right after on the quieter host (load
0.6-1.3): float32 29.2, 174.7, 289.5; bfloat16 26.2, 157.1, 360.5; int4 68.6, 213.6,
225.2 (2.35x, 1.22x, 0.78x); fp16 72.6, 254.6, 364.0 (2.49x, 1.46x, 1.26x); int8act 63.4,
257.1, 329.1 (2.17x, 1.47x, 1.14x).
``quant_serving_llama_server.json``: the same CPU with llama.cpp's batching server built
here, 4 ABBA rounds, load 1.0-2.4 (a test run niced beside it): tok/s at 1, 8, 32 streams
llama-server 125.5, 113.0, 144.4 (TPOT 7.9, 59.5, 186.6 ms: its one thread multiplies each
row's Q8 activations against the Q4_1 weights again, so 8 streams are no faster than one;
8 slots instead of 32 gave the same 113.8 at 8 streams, 1 slot 147.4 at 1 stream); int4
67.4, 216.0, 238.5 = **0.54x, 1.91x, 1.65x llama-server**; fp16 0.51x, 2.07x, 2.25x;
int8act 0.39x, 1.89x, 2.10x. Against float32 (28.3, 173.3, 286.3): int4 2.38x, 1.25x,
0.83x; fp16 2.25x, 1.35x, 1.13x. Peak RSS: llama-server 348, int4 983, fp16 1428, float32
2178 MiB.
``quant_serving_bf16_kernel.json``: the same CPU, the ``bf16`` kernel added, 4 ABBA rounds,
load ~1.5: tok/s at 1, 8, 32 streams float32 29.5, 166.7, 292.7; bfloat16 24.4, 156.0,
359.1; int4 61.9, 210.2, 227.0 (2.10x, 1.26x, 0.78x); fp16 60.7, 232.7, 328.8 (2.06x,
1.40x, 1.12x); bf16 66.2, 266.4, 464.4 (**2.24x, 1.60x, 1.59x**; peak RSS 1259 MiB).
``quant_serving_bf16_packed.json``: after bfloat16 float matrices are packed by oneDNN
(molink.models.cpu_linear), 4 ABBA rounds, load ~1: float32 30.5, 191.0, 313.8; bfloat16
56.6, 282.6, 502.7 (1.86x, 1.48x, 1.60x float32; peak 1650 MiB); int4 70.5, 233.0, 267.9
(2.32x, 1.22x, 0.85x); bf16 72.3, 284.6, 507.9 (2.38x, 1.49x, 1.62x).
``quant_serving_final.json``: llama-server and the molink servers of the final tree in one
run, 4 ABBA rounds, load 0.3-1.6, one round slow for every molink server (bf16's 1-stream
rounds 41-74 tok/s, so its medians are noisy): llama-server 124.9, 114.1, 145.3; int4 63.0,
212.0, 246.2 (0.50x, 1.86x, 1.69x llama-server; 2.20x, 1.15x, 0.87x float32); bf16 50.2,
213.0, 430.1 (0.40x, 1.87x, 2.96x; 1.75x, 1.15x, 1.52x); float32 28.7, 184.5, 283.8;
bfloat16 54.6, 247.7, 483.4.
``quant_serving_stop22.json``: the same four servers on a later tree, 2 ABBA rounds on a
quiet host (load 0.8-1.1; the page cache held SmolLM2's converted weights only after the
first start): llama-server 173.7, 139.3, 173.0 (TPOT 5.7 ms at 1 stream); int4 87.5,
268.8, 318.4 (**0.50x, 1.93x, 1.84x llama-server**; 2.45x, 1.21x, 0.84x float32); bf16
87.4, 315.3, 581.6 (0.50x, 2.26x, 3.36x; 2.45x, 1.42x, 1.53x); float32 35.7, 221.4, 379.2.
Peak RSS (the highest of the rounds, the first start's conversion included): llama-server
354, int4 1064, bf16 1221, float32 1917 MiB.
``quant_serving_joined_head.json``: after two-plane matrices are cached joined (no copy at
load) and with ``molink_q4_1_kv_bf16`` (16-bit KV, as llama.cpp's), one round, quiet host
(load 0.3-0.6): llama-server 165.4, 141.0, 169.7; int4 86.1, 251.8, 296.2 (0.52x, 1.79x,
1.75x; 2.38x, 1.29x, 0.83x float32); int4 with bfloat16 KV 88.6, 259.2, 296.9 (0.54x,
1.84x, 1.75x); float32 36.1, 195.3, 357.7. Peak RSS: llama-server 353, int4 576 (1.63x),
int4 with bfloat16 KV **505 (1.43x)**, float32 1842 MiB.
``quant_serving_long_kv_dtype.json`` (``--prompt-tokens 1500 --streams 1,8``, one round,
load ~0.9): the Q4_1 server with its default bfloat16 cache against ``molink_q4_1_kv_f32``:
decode tok/s 49.3 against 45.2 at 1 stream, 24.2 against 20.3 at 8; peak 810 against
1073 MiB.
``quant_serving_stop23.json``: llama-server, the Q4_1 server with its defaults (bfloat16
cache) and float32, 2 ABBA rounds, load 0.2-0.9, every server slower than in the run
before on this host (llama-server 139.5/152.5 at 1 stream against 165.4): llama-server
139.5, 126.9, 162.6; Q4_1 73.4, 223.2, 262.0 (0.53x, 1.76x, 1.61x llama-server; 2.31x,
1.16x, 0.81x float32); float32 31.8, 192.5, 324.7. Peak RSS: llama-server 354, Q4_1
**501 (1.42x)**, float32 1842 MiB.
``quant_serving_aligned.json``: the same three servers after the packed cache put its
tensors on 64-byte boundaries (molink/weights/aligned_safetensors.py), one round, load
0.5-0.9, llama-server again slower than on the quietest runs: llama-server 136.2, 118.3,
155.0; Q4_1 74.3, 220.3, 253.4 (0.55x, 1.86x, 1.63x llama-server; 2.37x, 1.20x, 0.80x
float32); float32 31.4, 183.0, 314.8. Peak RSS: llama-server 355, Q4_1 504 (1.42x).
``quant_serving_aligned_2rounds.json``: the same with 2 ABBA rounds, load 0.6-0.9:
llama-server 146.4, 126.0, 155.4; Q4_1 78.6, 235.5, 274.3 (0.54x, 1.87x, 1.77x
llama-server; 2.53x, 1.25x, 0.98x float32; TPOT at 1 stream 12.26 ms against 6.80);
float32 31.1, 189.0, 279.7. Peak RSS: llama-server 353, Q4_1 505 (1.43x), float32 1841.
``quant_serving_streamlined.json``: after the decode path's call overhead was cut
(bench/quant_step_overhead.py's ``quant_step_streamlined.json``), 2 ABBA rounds, load
0.5-1.0: llama-server 145.6, 130.0, 157.9; Q4_1 80.8, 241.2, 269.9 (0.55x, 1.85x, 1.71x;
2.61x, 1.35x, 0.87x float32; TPOT at 1 stream 12.0 ms); float32 31.0, 178.5, 311.8.
``quant_serving_prefill_int4.json``: then with the int4 kernel for prefill chunks too on
this CPU (molink/quant/kernels.py's ``int4_row_limit``), 2 ABBA rounds, load 0.2-0.9:
llama-server 152.0, 133.2, 167.5 (TPOT 6.56 ms at 1 stream); Q4_1 **87.2, 253.0, 302.0**
(**0.57x, 1.90x, 1.80x llama-server; 2.64x, 1.32x, 0.98x float32**; TPOT 11.1 ms; TTFT at
32 streams 951 ms against llama-server's 1338); float32 33.1, 192.0, 308.6. Peak RSS:
llama-server 355, Q4_1 502 (1.41x), float32 1842 MiB.
Long contexts against llama-server (``--prompt-tokens 1500 --streams 1,8 --servers
llama_server,molink_q4_1 --rounds 2``; llama-server then gets 8 slots of 1,628 tokens,
``llama_slots``): ``quant_serving_long_llama.json`` (before the int4 prefill) Q4_1 10.47
and 12.05 tok/s at 1 and 8 streams against 8.17 and 9.16 (1.28x, 1.32x), TTFT 4.9 s
against 7.0 s at one stream; ``quant_serving_long_llama_prefill_int4.json`` (after) Q4_1
**14.21 and 17.05** against 8.27 and 9.33 (**1.72x, 1.83x**), TTFT **3.3 s** against 7.0 s
(13.7 s against 27.4 s at 8 streams); decode alone (streams x 1000 / TPOT) 52.8 and 31.1
tok/s against 81.6 and 18.4: llama-server's single stream decodes a 1,500-token context
faster (12.3 ms per token against 18.9), its 8 streams slower. Peak RSS 819 against
473 MiB (molink's servers get a 2 GiB KV cache for long prompts, filled as needed).

``quant_serving_direct.json`` (2 ABBA rounds, load 0.35-0.9), after pre-norm layers of int4
planes skip module dispatch (molink/models/blocks/direct_decode.py): Q4_1 91.8, 243.9,
296.6 tok/s at 1, 8, 32 streams (TPOT 10.56 ms at one) against llama-server's 151.6, 127.7,
167.7 (0.61x, 1.91x, 1.77x) and float32's 30.9, 188.6, 291.6 (2.97x, 1.29x, 1.02x); peak
497 MiB against 355 (1.40x). ``quant_serving_slot_run.json`` (the same command, a later
tree whose new keys go into a run of slots with one copy; load 0.7-0.9): Q4_1 88.5, 254.9,
314.1 (TPOT 10.95 ms) against llama-server's 158.8, 133.1, 164.8 (TPOT 6.28: 0.56x, 1.92x,
1.91x) and float32's 33.2, 206.6, 299.6 (2.67x, 1.23x, 1.05x); peak 500 MiB against 354.
One stream's TPOT moves by ~0.5 ms between runs on this shared host (10.2-10.6 ms in
repeated single requests to one server the same hour, ad hoc).
``quant_serving_stop28.json`` (the same three servers, ``--rounds 4``, load 0.34-1.05, this
host ~7% slower for every server than the day before): Q4_1 88.4, 253.0, 313.7 (TPOT 10.92
ms) against llama-server's 137.0, 127.2, 165.4 (TPOT 7.29: 0.65x, 1.99x, 1.90x) and
float32's 31.8, 187.5, 326.9 (2.78x, 1.35x, 0.96x); peak 504 MiB against 355 (1.42x).
``quant_serving_stop28_5way.json`` (just before it, ``--servers llama_server,molink_q4_1,
molink_q4_1_bf16,molink_float32,molink_bfloat16 --rounds 2``, load 0.31-1.07): llama-server
134.1, 127.0, 163.7; Q4_1 80.9, 239.3, 283.6; Q4_1 with the ``bf16`` kernel 68.7, 280.2,
442.0 (peak 887 MiB); float32 30.6, 193.5, 334.8; bfloat16 59.6, 308.8, 535.8 (peak 1179).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    LOOPBACK,
    free_port,
    molink_serve_command,
    running_server,
    write_results,
)
from molink.loadgen.runner import LoadConfig, run_load  # noqa: E402
from molink.loadgen.workload import RequestSpec  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("quant_serving")

PROMPT = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle and "
    "decides to travel across the ocean to find the sender. Chapter"
)
NEW_TOKENS = 64  # default; --new-tokens


def cpu_flags() -> list[str]:
    """The CPU's vector extensions: torch's int4 and bf16 CPU kernels take different paths
    on AVX2 and on AVX-512 with bf16 dot products, so figures only compare within one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                wanted = ("avx", "amx", "fma", "f16c")
                return sorted({f for f in line.split()[2:] if f.startswith(wanted)})
    return []


def _peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


# llama.cpp's own server: one slot per stream of the largest run, continuous batching across
# slots (as molink batches its sequences), one thread for decode and for batches; 256 tokens
# of 16-bit KV per slot (prompt + 64 new tokens fit).
LLAMA_SERVER_SLOTS = 32
LLAMA_SLOT_TOKENS = 256


def llama_server_flags(
    binary: str, gguf: str, slots: int = LLAMA_SERVER_SLOTS, slot_tokens: int = LLAMA_SLOT_TOKENS
) -> list[str]:
    """llama-server splits ``--ctx-size`` evenly between its ``--parallel`` slots."""
    return [binary, "--model", gguf, "--threads", "1", "--threads-batch", "1",
            "--parallel", str(slots), "--cont-batching",
            "--ctx-size", str(slot_tokens * slots), "--host", LOOPBACK]  # fmt: skip


def llama_slots(stream_counts: list[int], prompt_tokens: int, new_tokens: int) -> tuple[int, int]:
    """Slots and tokens per slot: long prompts get as many slots as the largest run has
    streams, each holding its prompt and answer (llama-server refuses a longer request)."""
    if not prompt_tokens:
        return LLAMA_SERVER_SLOTS, LLAMA_SLOT_TOKENS
    return max(stream_counts), prompt_tokens + new_tokens + 64


def servers(
    llama_python: str | None,
    llama_server: str | None = None,
    slots: tuple[int, int] = (LLAMA_SERVER_SLOTS, LLAMA_SLOT_TOKENS),
) -> dict[str, list[str] | None]:
    gguf = str(default_model_gguf())
    common = ["--num-threads", "1", "--max-num-seqs", "64"]
    found: dict[str, list[str] | None] = {
        "molink_q4_1": ["--model", gguf, "--quantization", "gguf", *common],
        # Its KV cache in float32 (the default for int4-kernel weights on a CPU is bfloat16,
        # as llama.cpp keeps its own cache in 16 bits; results files from before that
        # default name the bfloat16 server molink_q4_1_kv_bf16).
        "molink_q4_1_kv_f32": [
            "--model",
            gguf,
            "--quantization",
            "gguf",
            "--kv-cache-dtype",
            "float32",
            *common,
        ],
        "molink_q4_1_fp16": [
            "--model",
            gguf,
            "--quantization",
            "gguf",
            "--quantized-batch-kernel",
            "fp16",
            *common,
        ],
        "molink_q4_1_bf16": [
            "--model",
            gguf,
            "--quantization",
            "gguf",
            "--quantized-batch-kernel",
            "bf16",
            *common,
        ],
        "molink_q4_1_int8act": [
            "--model",
            gguf,
            "--quantization",
            "gguf",
            "--quantized-batch-kernel",
            "int8act",
            *common,
        ],
        "molink_float32": [
            "--model",
            gguf,
            "--quantization",
            "none",
            "--dtype",
            "float32",
            *common,
        ],
        "molink_bfloat16": [
            "--model",
            gguf,
            "--quantization",
            "none",
            "--dtype",
            "bfloat16",
            *common,
        ],
        "llama_cpp": None,
        "llama_server": llama_server_flags(llama_server, gguf, *slots) if llama_server else None,
    }
    if llama_python:
        found["llama_cpp"] = [llama_python, "-m", "llama_cpp.server", "--model", gguf,
                              "--n_threads", "1", "--n_ctx", "4096", "--host", LOOPBACK,
                              # else each new request cuts the running one short
                              "--interrupt_requests", "False"]  # fmt: skip
    return found


def command_for(name: str, flags: list[str], port: int) -> list[str]:
    if name in LLAMA_CPP_SERVERS:
        return [*flags, "--port", str(port)]
    return molink_serve_command(port, flags)


# llama.cpp's server ends a stream at SmolLM2's end tokens whatever ``ignore_eos`` says: an
# OpenAI ``logit_bias`` forbids them (<|endoftext|>, <|im_start|>, <|im_end|>), so every
# stream generates the tokens asked for, as molink's do.
LLAMA_CPP_BODY = {"logit_bias": {"0": -100, "1": -100, "2": -100}}
LLAMA_CPP_SERVERS = ("llama_cpp", "llama_server")


async def measure(
    base_url: str,
    streams: int,
    new_tokens: int,
    prompt_tokens: int = 0,
    extra_body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``prompt_tokens`` > 0: prompts of that many token ids (long contexts), else text."""
    if prompt_tokens:
        specs = [RequestSpec(long_prompt(prompt_tokens, i), new_tokens) for i in range(streams)]
    else:
        specs = [RequestSpec(f"{PROMPT} {i + 1}:", new_tokens) for i in range(streams)]
    config = LoadConfig(
        base_url=base_url,
        read_timeout_s=600.0,
        run_timeout_s=1800.0,
        extra_body=dict(extra_body or {}),
    )
    load_before = os.getloadavg()[0]
    result = await run_load(specs, config)
    s = result.summary
    return {
        "streams": streams,
        "output_tok_s": round(s.output_throughput, 2),
        "ttft_mean_ms": s.ttft_mean_ms,
        "tpot_mean_ms": s.tpot_mean_ms,
        "completed": s.num_completed,
        "output_tokens": s.total_output_tokens,
        "length_mismatches": s.num_length_mismatches,
        "errors": s.error_samples,
        # Steady decode rate of all streams together (TPOT excludes the prefill).
        "decode_tok_s": round(streams * 1000 / s.tpot_mean_ms, 2) if s.tpot_mean_ms else None,
        # 1-minute load average of the shared host before and after this measurement.
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def long_prompt(tokens: int, index: int) -> list[int]:
    """Distinct token ids (no shared prefix to cache) of SmolLM2's ordinary vocabulary."""
    gen = torch.Generator().manual_seed(index)
    return torch.randint(1000, 40000, (tokens,), generator=gen).tolist()


def run(
    llama: tuple[str | None, str | None],
    stream_counts: list[int],
    new_tokens: int,
    only: str | None,
    prompt_tokens: int = 0,
) -> dict[str, Any]:
    """``llama``: llama-cpp-python's interpreter and llama.cpp's server binary (or None)."""
    results: dict[str, Any] = {}
    slots = llama_slots(stream_counts, prompt_tokens, new_tokens)
    for name, flags in servers(*llama, slots).items():
        if only is not None and name not in only.split(","):
            continue
        if flags is None:
            results[name] = {"skipped": "no --llama-python / --llama-server given"}
            continue
        if prompt_tokens and name not in LLAMA_CPP_SERVERS:
            flags = [*flags, "--kv-cache-memory", "2GiB"]
        port = free_port()
        # llama-cpp-python's server has no /health; its model list answers once loaded.
        health = "/v1/models" if name == "llama_cpp" else "/health"
        with running_server(
            command_for(name, flags, port), port, env={"OMP_NUM_THREADS": "1"}, health_path=health
        ) as server:
            body = LLAMA_CPP_BODY if name in LLAMA_CPP_SERVERS else None
            # One short request first: lazy initialisation does not land in the figures.
            asyncio.run(measure(server.base_url, 1, 4, extra_body=body))
            runs = [
                asyncio.run(measure(server.base_url, n, new_tokens, prompt_tokens, body))
                for n in stream_counts
            ]
            results[name] = {"runs": runs, "peak_rss_mib": _peak_rss_mib(server.process.pid)}
        logger.info("%s: %s", name, results[name])
    return results


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """Each quantized server's tok/s over each other server's, per stream count."""
    out: dict[str, Any] = {}
    quantized_servers = (
        "molink_q4_1",
        "molink_q4_1_kv_f32",
        "molink_q4_1_fp16",
        "molink_q4_1_bf16",
        "molink_q4_1_int8act",
    )
    for quantized in quantized_servers:
        if "runs" not in results.get(quantized, {}):
            continue
        base = {r["streams"]: r["output_tok_s"] for r in results[quantized]["runs"]}
        for name, entry in results.items():
            if name.startswith("molink_q4_1") or "runs" not in entry:
                continue
            out[f"{quantized.removeprefix('molink_')}_over_{name}"] = {
                str(r["streams"]): round(base[r["streams"]] / r["output_tok_s"], 2)
                for r in entry["runs"]
                if r["output_tok_s"] and r["streams"] in base
            }
    return out


def combine(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's rounds: per stream count the round with the median tok/s (its TTFT and
    TPOT with it), every round's tok/s, and the highest peak memory."""
    if any("runs" not in e for e in entries):
        return entries[-1]
    runs = []
    for index in range(len(entries[0]["runs"])):
        same = sorted((e["runs"][index] for e in entries), key=lambda r: r["output_tok_s"])
        median = dict(same[(len(same) - 1) // 2])
        median["rounds_tok_s"] = [e["runs"][index]["output_tok_s"] for e in entries]
        runs.append(median)
    rss = [e["peak_rss_mib"] for e in entries if e.get("peak_rss_mib") is not None]
    return {"runs": runs, "peak_rss_mib": max(rss) if rss else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", default=None, help="python of llama-cpp-python's venv")
    parser.add_argument(
        "--llama-server", default=None, help="llama.cpp's llama-server binary (batching server)"
    )
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--servers", default=None, help="comma-separated subset of the servers")
    parser.add_argument("--name", default="quant_serving", help="results file name")
    parser.add_argument(
        "--prompt-tokens", type=int, default=0, help="long contexts: prompts of this many tokens"
    )
    parser.add_argument("--rounds", type=int, default=1, help="ABBA rounds of all servers")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    streams = [int(n) for n in args.streams.split(",")]
    llama = (args.llama_python, args.llama_server)
    names = args.servers.split(",") if args.servers else list(servers(*llama))
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    results: dict[str, Any] = {}
    # Rounds alternate the servers' order (ABBA): a loaded host's drift reaches all alike.
    order = [n for r in range(args.rounds) for n in (names if r % 2 == 0 else names[::-1])]
    for name in order:  # written after each server: a long run keeps what it measured
        got = run(llama, streams, args.new_tokens, name, args.prompt_tokens)
        rounds[name].append(got[name])
        results[name] = combine(rounds[name])
        write_results(
            args.name,
            {
                "new_tokens": args.new_tokens,
                "rounds": args.rounds,
                "cpu_flags": cpu_flags(),
                "load_average_at_write": [round(x, 2) for x in os.getloadavg()],
                "prompt_tokens": args.prompt_tokens or "text",
                "servers": results,
                "ratios": ratios(results),
            },
        )


if __name__ == "__main__":
    main()
