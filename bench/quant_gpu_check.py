"""Quantized weights on a CUDA GPU: the int4 (tinygemm) and fp8 kernels, then whole models.

Kernels: for int4 planes made from each kind of quantized matrix (4-bit group 32 as GGUF
Q4_*, 4-bit group 128 as AWQ/GPTQ, 8-bit group 32 as two planes as Q8_0/int8), on
SmolLM2's q/k/v shape and its 49152-row table, at 1, 7, 32 and 200 rows: the relative error
of ``CudaInt4Planes.matmul`` against the dequantized matrix in float64, the table's gathered
rows against the dequantized rows, and ms per product against bfloat16 ``F.linear``; fp8
rows likewise where the GPU has fp8 (compute capability 8.9+). Models
(bench/quant_gpu_models.py): a real GGUF on the GPU against the CPU, AWQ and GPTQ
checkpoints against their dequantized float models, int4/int8/fp8 quantized at load, and
decode speed of a Llama-3.2-1B-shaped model quantized against bfloat16.

    python bench/quant_gpu_check.py [--gguf FILE]   # on the GPU machine
    python bench/quant_gpu_check.py --smoke --device cpu --out /tmp/q.json

``--gguf``: the GGUF to check (default: the installed default model); bench/gguf_first_layers.py
cuts a smaller one that travels. Writes ``bench/results/quant_gpu_check.json`` unless
``--out`` says otherwise; exits 1 if a bound is exceeded (int4 kernels: 2e-2 relative, the
bfloat16 activations and scales; fp8: 6e-2; models: the unit tests' bounds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import machine_info, write_results  # noqa: E402
from bench.gpu_check import Budget, run_section  # noqa: E402
from molink.quant.cuda_int4 import to_cuda_int4  # noqa: E402
from molink.quant.fp8 import MIN_CAPABILITY, Fp8Rows  # noqa: E402
from molink.quant.groups import quantize_float  # noqa: E402

logger = logging.getLogger("quant_gpu_check")
ROWS = (1, 7, 32, 200)
# SmolLM2's q/k/v and table (576 inputs: groups of 32 only), Llama-3.2-1B's q/k/v (2048).
SHAPES = {"qkv": (960, 576), "table": (49152, 576), "qkv_2048": (3072, 2048)}
SECTIONS = ("kernels", "gguf_model", "awq_gptq", "on_the_fly", "throughput")
KINDS = {"int4_g32": (4, 32), "int4_g128": (4, 128), "int8_g32": (8, 32)}
INT4_BOUND, FP8_BOUND = 2e-2, 6e-2


def _ms(fn: Callable[[], Any], repeat: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return round((time.perf_counter() - started) * 1e3 / repeat, 4)


def _rel(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.double() - expected).norm() / expected.norm())


def kernel_checks(device: torch.device) -> tuple[dict[str, Any], bool]:
    gen = torch.Generator().manual_seed(0)
    results: dict[str, Any] = {}
    ok = True
    for shape_name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.02
        dense16 = w.to(device, torch.bfloat16)
        candidates: dict[str, Any] = {}
        for kind, (bits, group) in KINDS.items():
            if k % group:
                continue  # a matrix this wide is never grouped so
            ints = quantize_float(w, bits, group)
            candidates[kind] = (to_cuda_int4(ints, device, table=True), ints.dequantize())
        if torch.cuda.get_device_capability(device) >= MIN_CAPABILITY:
            candidates["fp8_rows"] = (Fp8Rows(w.to(device)), w)
        for name, (matrix, exact) in candidates.items():
            bound = FP8_BOUND if name == "fp8_rows" else INT4_BOUND
            exact64 = exact.double().to(device)
            entry: dict[str, Any] = {}
            for rows in ROWS:
                x = torch.randn(rows, k, generator=gen).to(device)
                err = _rel(matrix.matmul(x), x.double() @ exact64.t())
                ok &= err < bound
                entry[str(rows)] = {
                    "rel_err": err,
                    "ms": _ms(lambda m=matrix, x=x: m.matmul(x)),
                    "bf16_ms": _ms(lambda x=x, d=dense16: F.linear(x.to(torch.bfloat16), d)),
                }
            ids = torch.tensor([0, 5, n - 1], device=device)
            gather_err = _rel(matrix.gather_rows(ids), exact64[ids])
            ok &= gather_err < bound
            entry["gather_rel_err"] = gather_err
            entry["bytes"] = matrix.nbytes
            results[f"{shape_name}/{name}"] = entry
            logger.info("%s/%s: %s", shape_name, name, entry)
    return results, ok


def _kernels_section(device: torch.device) -> dict[str, Any]:
    kernels, ok = kernel_checks(device)
    return {"per_matrix": kernels, "passed": ok}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a CPU run")
    parser.add_argument("--gguf", type=Path, default=None, help="default: the default model")
    parser.add_argument("--budget-s", type=float, default=300.0)
    parser.add_argument("--out", default=None, help="results file (default: bench/results/)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    args = parser.parse_args(argv)
    wanted = set(args.sections.split(","))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.error("no CUDA device")
        return 2
    from bench import quant_gpu_models as models
    from molink.weights import default_model_gguf

    budget = Budget(args.budget_s)
    results: dict[str, Any] = {"benchmark": "quant_gpu_check", "machine": machine_info()}
    if device.type == "cuda":
        results["device"] = torch.cuda.get_device_name(device)
        results["capability"] = list(torch.cuda.get_device_capability(device))
        run_section(results, "kernels", budget, 20, lambda: _kernels_section(device), wanted)
    with tempfile.TemporaryDirectory(prefix="molink-quant-gpu-") as tmp:
        work = Path(tmp)
        run_section(results, "gguf_model", budget, 30,
                    lambda: models.gguf_model(args.gguf or default_model_gguf(), device, args.smoke),
                    wanted)  # fmt: skip
        run_section(results, "awq_gptq", budget, 30,
                    lambda: models.awq_gptq(device, work, args.smoke), wanted)  # fmt: skip
        run_section(results, "on_the_fly", budget, 20,
                    lambda: models.on_the_fly(device, work, args.smoke), wanted)  # fmt: skip
        run_section(results, "throughput", budget, 60,
                    lambda: models.throughput(device, work, args.smoke, budget.left), wanted)  # fmt: skip
    results["command"] = " ".join(["python", *sys.argv])
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    else:
        write_results("quant_gpu_check", results)
    failed = [name for name, r in results.items() if isinstance(r, dict) and
              (r.get("passed") is False or "error" in r)]  # fmt: skip
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
