"""How fast any matrix-product kernel could make a SmolLM2 decode step on this CPU.

A decode step's products read every weight once and do ``rows x MACs-per-token``
multiply-adds, so on one core they take at least the longer of the weights' bytes over
the memory bandwidth and the multiply-adds over the core's peak rate in the kernel's
arithmetic. This script measures those peaks on one thread (large square products in
float32 and bfloat16 — oneDNN's avx512_bf16 path where the CPU has it — integer products
through ``torch._int_mm``, and a streaming read for the bandwidth), then for 1, 8 and 32
rows combines them with SmolLM2-135M's shapes and Q4_1 file size into the fastest the
products could be, and with the step breakdown's measured non-product time per step
(``--breakdown``, default ``quant_step_breakdown_avx512bf16``) into the largest speed-up
over float32's measured step that any kernel of each arithmetic could give.

    OMP_NUM_THREADS=1 python bench/cpu_compute_bound.py [--breakdown NAME] [--name NAME]

Writes ``bench/results/<name>.json`` (default ``cpu_compute_bound``). The committed run
(``--breakdown quant_step_breakdown_bf16_kernel``; AMD EPYC with AVX-512 and avx512_bf16,
one thread, load 1.4): peaks 108 GMAC/s in float32 (oneDNN packed), 228 in bfloat16, 466
in int8; reads at 39 GB/s, so the Q4_1 file's 98 MB take 2.5 ms. With the least
non-product time a quantized step measured (4.6, 7.8, 17.6 ms at 1, 8, 32 rows) the largest
speed-ups over float32's step (31.8, 36.6, 73.7 ms) any kernel could give are 4.5x at 1 row
(bytes decide), 2.9x at 8 rows in bfloat16 arithmetic (2.1x if it multiplied in float32),
and 2.0x at 32 rows in bfloat16, 2.75x in int8: at 32 streams twice float32 needs a
kernel at bfloat16's peak or int8 arithmetic, and int8 activations cost the fidelity bar
(molink/quant/kernels.py). The kernels torch can call are far from these at few rows: the
int4 kernel's 1-row pass takes 7-8 ms (12-14 GB/s of the 39) and 16-21 ms at 8 rows;
oneDNN's bfloat16 copy comes closest at 32 rows (33.9 ms of products against 18.9).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import RESULTS_DIR, write_results  # noqa: E402
from bench.quant_serving import cpu_flags  # noqa: E402
from molink.models.cpu_linear import PACKED_MAX_ROWS, linear, prepack  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("cpu_compute_bound")

# SmolLM2-135M: hidden 576, MLP 1536, 9 query and 3 key/value heads of 64, 30 layers,
# vocabulary 49,152 (the LM head is the tied embedding, multiplied for every row).
HIDDEN, MLP, KV_DIM, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
LAYER_MACS = HIDDEN * (HIDDEN + 2 * KV_DIM + HIDDEN) + 3 * HIDDEN * MLP
MACS_PER_TOKEN = LAYERS * LAYER_MACS + HIDDEN * VOCAB
ROWS = (1, 8, 32)
QUANTIZED_MODES = ("int4", "fp16", "bf16", "int8act")


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: packing, page faults, oneDNN primitive creation
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_peak_gmacs(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The faster of a square ``torch.mm`` and oneDNN's prepacked float32 linear (the path
    molink.models.cpu_linear serves decode batches with), its most rows x ``size``^2."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    rates = [size**3 / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9]
    packed = prepack(b)
    if packed is not None:
        x = a[:PACKED_MAX_ROWS].contiguous()
        seconds = best_seconds(lambda: linear(x, b, packed, None), repeats * 4)
        rates.append(PACKED_MAX_ROWS * size * size / seconds / 1e9)
    return max(rates)


def int8_peak_gmacs(size: int = 2048, repeats: int = 5) -> float | None:
    """``torch._int_mm`` (int8 x int8 -> int32): the arithmetic llama.cpp's Q4 x Q8 dot
    products use; None where this build has no CPU path for it."""
    a = torch.randint(-127, 127, (size, size), dtype=torch.int8)
    b = torch.randint(-127, 127, (size, size), dtype=torch.int8)
    try:
        seconds = best_seconds(lambda: torch._int_mm(a, b), repeats)
    except RuntimeError as error:
        logger.info("no int8 product on this CPU build: %s", error)
        return None
    return size**3 / seconds / 1e9


def read_bandwidth_gb_s(megabytes: int = 1024, repeats: int = 5) -> float:
    data = torch.ones(megabytes * 1024 * 1024 // 4, dtype=torch.float32)
    return data.numel() * 4 / best_seconds(lambda: data.sum(), repeats) / 1e9


def breakdown_steps(name: str) -> dict[str, Any]:
    return json.loads((RESULTS_DIR / f"{name}.json").read_text())["streams"]


def bounds(peaks: dict[str, float | None], bandwidth: float, weight_bytes: int,
           steps: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Per row count: the fastest products per arithmetic, and float32's measured step over
    (the least non-product time any quantized kernel measured + those products)."""
    read_ms = weight_bytes / bandwidth / 1e6
    out: dict[str, Any] = {}
    for rows in ROWS:
        step = steps[str(rows)]
        other_ms = min(step[mode]["other_ms"] for mode in QUANTIZED_MODES if mode in step)
        entry: dict[str, Any] = {
            "float32_step_ms": step["float32"]["step_ms"],
            "least_other_ms": other_ms,
            "weights_read_ms": round(read_ms, 2),
        }
        for arithmetic, gmacs in peaks.items():
            if gmacs is None:
                continue
            compute_ms = rows * MACS_PER_TOKEN / gmacs / 1e6
            products_ms = max(read_ms, compute_ms)
            entry[arithmetic] = {
                "compute_ms": round(compute_ms, 2),
                "fastest_products_ms": round(products_ms, 2),
                "largest_speedup_vs_float32": round(
                    step["float32"]["step_ms"] / (other_ms + products_ms), 2
                ),
            }
        out[str(rows)] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breakdown", default="quant_step_breakdown_avx512bf16")
    parser.add_argument("--name", default="cpu_compute_bound")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    peaks = {
        "float32": gemm_peak_gmacs(torch.float32),
        "bfloat16": gemm_peak_gmacs(torch.bfloat16),
        "int8": int8_peak_gmacs(),
    }
    bandwidth = read_bandwidth_gb_s()
    weight_bytes = default_model_gguf().stat().st_size
    logger.info("peaks GMAC/s %s, read %.1f GB/s", peaks, bandwidth)
    write_results(
        args.name,
        {
            "cpu_flags": cpu_flags(),
            "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "macs_per_token": MACS_PER_TOKEN,
            "peak_gmacs_one_thread": {k: round(v, 1) if v else v for k, v in peaks.items()},
            "read_bandwidth_gb_s": round(bandwidth, 1),
            "q4_1_file_bytes": weight_bytes,
            "breakdown": args.breakdown,
            "rows": bounds(peaks, bandwidth, weight_bytes, breakdown_steps(args.breakdown)),
        },
    )


if __name__ == "__main__":
    main()
