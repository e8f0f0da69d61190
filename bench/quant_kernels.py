"""CPU matrix-product candidates for quantized weights, side by side on one torch thread.

Every candidate runs the products of one SmolLM2-135M forward pass, ``x @ W.T`` for the
30 layers' own matrices (fused q/k/v, o, fused gate/up, down) and the LM head, at the row
counts a decode or prefill step has. Distinct weights per layer, as in the model: the
matrices stream from memory as they do when serving (one matrix timed alone stays in the
CPU's caches and flatters the float32 kernels). Candidates:

* ``fp32`` / ``fp32_onednn``: float32 weights through MKL, and oneDNN-prepacked (what the
  float32 engine runs today);
* ``bf16``: bfloat16 weights through ``F.linear`` (oneDNN's packed bfloat16 GEMM,
  ``mkldnn._reorder_linear_weight``, refuses this CPU: it needs AVX-512 or AVX-NE-CONVERT);
* ``bf16_onednn``: the same bfloat16 weights packed by oneDNN (molink.quant.bf16_gemm:
  the ``bf16`` batch kernel; packing needs AVX-512 or AMX), activations converted;
* ``int4_g32``: torch's ``_weight_int4pack_mm_for_cpu`` (4-bit, group 32, bfloat16 scales
  and zero points, bfloat16 activations); ``int4_g32_fp32``: the same in float32;
* ``int4_g32_dequant``: the same planes dequantized a band of rows at a time into float32
  and multiplied by MKL (molink.quant.linear.dequant_matmul);
* ``int8_g32_2plane`` (and ``_dequant``): 8-bit integers as two int4 planes, the way
  Q5/Q6_K/Q8_0 and on-the-fly int8 run;
* ``int8_rows``: torch's ``_weight_int8pack_mm`` (one scale per row: lossy for GGUF's
  group-32 scales) in bfloat16, and ``int8_rows_fp32`` in float32;
* ``dyn_quant_4bit``: ``_dyn_quant_matmul_4bit`` (dynamic int8 activations, 4-bit weights;
  KleidiAI on Arm, a reference loop on x86);
* ``fbgemm_fp16``: fbgemm's float16-weight GEMM (``quantized::linear_dynamic_fp16``);
* ``fbgemm_int8``: fbgemm's int8 dynamic linear (per-row int8 weights, per-tensor uint8
  activations, 7-bit ``reduce_range``; too lossy for LLM activations, timed for reference);
* ``nbits_int4`` / ``nbits_int8``: onnxruntime's ``MatMulNBits`` on the same int4 planes
  (int8 activations per block of 32, molink.quant.nbits); ``torch._int_mm`` (int8 x int8)
  is a reference loop on CPU (~20x slower than float32 at 1 row), not a candidate.

torchao 0.18 installs beside torch 2.13 without replacing it, but its x86 wheel ships only
CUDA extensions: on CPU its int4 layout calls the same ``_weight_int4pack_mm_for_cpu`` as
``int4_g32``, so it is not a separate candidate.

    OMP_NUM_THREADS=1 python bench/quant_kernels.py [--rows 1,2,4,8,16,32,64]
    OMP_NUM_THREADS=1 python bench/quant_kernels.py --interleaved int4_g32,fbgemm_fp16,fp32 \
        --rows 1,2,4,8,16,32 --rounds 5 --name quant_kernels_fp16

Writes ``bench/results/quant_kernels.json``: milliseconds per model pass (median of
rounds) per candidate and row count, and the slow float32 paths on one matrix at 1 row.
The committed files are from an AVX2 CPU, except ``quant_kernels_avx512bf16.json`` (AVX-512
with ``avx512_bf16``, where ``bf16`` and ``int4_g32`` run faster paths; the figures are in
molink/quant/kernels.py) and ``quant_kernels_bound.json`` (the same CPU, the four
fastest candidates and float32 at 1, 8 and 32 rows: what bounds a quantized step against
float32, in the same module doc).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from bench.quant_serving import cpu_flags  # noqa: E402
from molink.quant.bf16_gemm import Bf16Packed  # noqa: E402
from molink.quant.groups import quantize_float  # noqa: E402
from molink.quant.int4 import to_int4_planes  # noqa: E402
from molink.quant.linear import dequant_matmul  # noqa: E402
from molink.quant.nbits import NBitsProduct  # noqa: E402

logger = logging.getLogger("quant_kernels")

# SmolLM2-135M: hidden 576, intermediate 1536, 9 query heads and 3 KV heads of 64, vocab 49152.
SHAPES = {
    "qkv": (960, 576),
    "o": (576, 576),
    "gate_up": (3072, 576),
    "down": (576, 1536),
    "lm_head": (49152, 576),
}
GROUP = 32
LAYERS = 30


def _time_ms(fn: Callable[[], Any], rounds: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1e3)
    return round(statistics.median(samples), 2)


def _model_weights(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [SHAPES[name] for name in ("qkv", "o", "gate_up", "down")] * LAYERS
    shapes.append(SHAPES["lm_head"])
    return [torch.randn(shape, generator=gen) * 0.02 for shape in shapes]


Product = Callable[[torch.Tensor], torch.Tensor]


def _prepare(name: str, w: torch.Tensor) -> Product:
    """One matrix in candidate ``name``'s form, as a function of float32 activations."""
    if name == "fp32":
        w_t = w.t().contiguous().t()  # column-major, as the float32 engine stores it
        return lambda x: F.linear(x, w_t)
    if name == "fp32_onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    if name == "bf16":
        w16 = w.to(torch.bfloat16)
        return lambda x: F.linear(x.to(torch.bfloat16), w16)
    if name == "bf16_onednn":
        return Bf16Packed(w).matmul
    if name in ("int4_g32", "int4_g32_dequant", "int8_g32_2plane", "int8_g32_2plane_dequant"):
        planes = to_int4_planes(quantize_float(w, 4 if name.startswith("int4") else 8, GROUP))
        if name.endswith("dequant"):
            return lambda x: dequant_matmul(planes, x)
        return lambda x: planes.matmul(x.to(torch.bfloat16))
    if name in ("nbits_int4", "nbits_int8"):
        bits = 4 if name == "nbits_int4" else 8
        product = NBitsProduct(to_int4_planes(quantize_float(w, bits, GROUP)))
        return product.matmul
    if name == "fbgemm_fp16":
        packed16 = torch.ops.quantized.linear_prepack_fp16(w, None)
        return lambda x: torch.ops.quantized.linear_dynamic_fp16(x, packed16)
    if name == "fbgemm_int8":
        scale = (w.abs().amax(1) / 127).double()
        zeros = torch.zeros(w.shape[0], dtype=torch.long)
        qw = torch.quantize_per_channel(w, scale, zeros, 0, torch.qint8)
        packed8 = torch.ops.quantized.linear_prepack(qw, None)
        return lambda x: torch.ops.quantized.linear_dynamic(x, packed8, True)
    if name == "int8_rows":
        scale = w.abs().amax(1) / 127
        q8 = (w / scale[:, None]).round().to(torch.int8)
        s16 = scale.to(torch.bfloat16)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q8, s16)
    raise ValueError(name)


# Candidate: the row counts it is timed at (bfloat16 F.linear is slow beyond a few rows).
CANDIDATES = {
    "fp32": None,
    "fp32_onednn": None,
    "bf16": (1, 4, 8),
    "bf16_onednn": None,
    "int4_g32": None,
    "int4_g32_dequant": None,
    "int8_g32_2plane": None,
    "int8_g32_2plane_dequant": None,
    "int8_rows": None,
    "fbgemm_fp16": None,
    "fbgemm_int8": None,
    "nbits_int4": None,
    "nbits_int8": None,
}


def model_pass_ms(
    rows_list: list[int], rounds: int, candidates: list[str]
) -> dict[str, dict[str, float]]:
    weights = _model_weights()
    results: dict[str, dict[str, float]] = {}
    for name in candidates:
        only = CANDIDATES[name]
        products = [_prepare(name, w) for w in weights]
        results[name] = {}
        for rows in rows_list:
            if only is not None and rows not in only:
                continue
            xs = {k: torch.randn(rows, k) * 0.1 for k in (576, 1536)}

            timed = functools.partial(_run, products, xs)
            results[name][str(rows)] = _time_ms(timed, rounds)
            logger.info("%s rows=%d: %.1f ms", name, rows, results[name][str(rows)])
    return results


def crossover_ms(rows_list: list[int], rounds: int) -> dict[str, dict[str, float]]:
    """int4 kernel against dequantize-and-MKL on the same planes, interleaved round by round
    (a loaded machine drifts; alternating keeps the two comparable)."""
    weights = _model_weights()
    planes = [to_int4_planes(quantize_float(w, 4, GROUP)) for w in weights]
    del weights
    kernel = [functools.partial(_kernel, p) for p in planes]
    dequant = [functools.partial(dequant_matmul, p) for p in planes]
    samples: dict[str, dict[str, list[float]]] = {"int4_g32": {}, "int4_g32_dequant": {}}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k) * 0.1 for k in (576, 1536)}
        for _ in range(rounds):
            for name, products in (("int4_g32", kernel), ("int4_g32_dequant", dequant)):
                started = time.perf_counter()
                _run(products, xs)
                ms = (time.perf_counter() - started) * 1e3
                samples[name].setdefault(str(rows), []).append(ms)
        logger.info("crossover rows=%d: %s", rows, {n: v[str(rows)] for n, v in samples.items()})
    return {
        name: {rows: round(statistics.median(v), 1) for rows, v in by_rows.items()}
        for name, by_rows in samples.items()
    }


def interleaved_ms(
    rows_list: list[int], rounds: int, candidates: list[str]
) -> dict[str, dict[str, float]]:
    """Candidates' model passes alternating round by round (a loaded host drifts)."""
    weights = _model_weights()
    products = {name: [_prepare(name, w) for w in weights] for name in candidates}
    del weights
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in candidates}
    for rows in rows_list:
        xs = {k: torch.randn(rows, k) * 0.1 for k in (576, 1536)}
        for _ in range(rounds):
            for name in candidates:
                started = time.perf_counter()
                _run(products[name], xs)
                ms = (time.perf_counter() - started) * 1e3
                samples[name].setdefault(str(rows), []).append(ms)
        logger.info("rows=%d: %s", rows, {n: v[str(rows)] for n, v in samples.items()})
    return {
        name: {rows: round(statistics.median(v), 1) for rows, v in by_rows.items()}
        for name, by_rows in samples.items()
    }


def _kernel(planes, x: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return planes.matmul(x.to(torch.bfloat16))


def _run(products: list[Product], xs: dict[int, torch.Tensor]) -> None:
    for index, product in enumerate(products):
        product(xs[1536] if index % 4 == 3 and index < 4 * LAYERS else xs[576])


def slow_paths_us() -> dict[str, float]:
    """The float32-activation paths of the quantized kernels, on the q/k/v matrix, 1 row."""
    n, k = SHAPES["qkv"]
    w = torch.randn(n, k) * 0.02
    x = torch.randn(1, k)
    planes = to_int4_planes(quantize_float(w, 4, GROUP))
    planes32 = replace(planes, scale_zero=planes.scale_zero.float())
    scale = w.abs().amax(1) / 127
    q8 = (w / scale[:, None]).round().to(torch.int8)
    dyn = torch.ops.aten._dyn_quant_pack_4bit_weight(
        torch.randint(0, 16, (n, k // 2), dtype=torch.uint8),
        torch.rand(n, k // GROUP), None, GROUP, k, n,
    )  # fmt: skip
    fns: dict[str, Callable[[], Any]] = {
        "fp32": lambda: F.linear(x, w),
        "int4_g32_bf16": lambda: planes.matmul(x.to(torch.bfloat16)),
        "int4_g32_fp32": lambda: planes32.matmul(x),
        "int8_rows_bf16": lambda: torch.ops.aten._weight_int8pack_mm(
            x.to(torch.bfloat16), q8, scale.to(torch.bfloat16)
        ),
        "int8_rows_fp32": lambda: torch.ops.aten._weight_int8pack_mm(x, q8, scale),
        "dyn_quant_4bit": lambda: torch.ops.aten._dyn_quant_matmul_4bit(x, dyn, GROUP, k, n),
    }
    out = {}
    for name, fn in fns.items():
        out[name] = round(_time_ms(lambda fn=fn: [fn() for _ in range(20)], 5) * 1e3 / 20, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,4,8,16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--name", default="quant_kernels", help="results file name")
    parser.add_argument(
        "--crossover", default=None, help="rows at which to compare int4 and dequantizing only"
    )
    parser.add_argument(
        "--interleaved", default=None, help="candidates to compare round by round only"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows_list = [int(r) for r in args.rows.split(",")]
    if args.interleaved:
        chosen = args.interleaved.split(",")
        load = [round(os.getloadavg()[0], 2)]
        ms = interleaved_ms(rows_list, args.rounds, chosen)
        load.append(round(os.getloadavg()[0], 2))  # 1-minute load average, start and end
        write_results(
            args.name,
            {"threads": 1, "cpu_flags": cpu_flags(), "load_average": load, "interleaved_ms": ms},
        )
        return
    if args.crossover:
        rows = [int(r) for r in args.crossover.split(",")]
        write_results(args.name, {"threads": 1, "crossover_ms": crossover_ms(rows, args.rounds)})
        return
    slow = slow_paths_us()
    logger.info("slow paths (us, qkv, 1 row): %s", slow)
    results = model_pass_ms(rows_list, args.rounds, args.candidates.split(","))
    write_results(
        args.name,
        {
            "threads": torch.get_num_threads(),
            "model_pass_ms": results,
            "qkv_1row_us": slow,
        },
    )


if __name__ == "__main__":
    main()
