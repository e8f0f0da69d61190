"""Quantized matrices on a CUDA GPU: the int4 (tinygemm) and fp8 paths against float.

For int4 planes made from each kind of quantized matrix (4-bit group 32 as GGUF Q4_*,
4-bit group 128 as AWQ/GPTQ, 8-bit group 32 as two planes as Q8_0/int8), on SmolLM2's
q/k/v shape and its 49152-row table, at 1, 7, 32 and 200 rows: the relative error of
``CudaInt4Planes.matmul`` against the dequantized matrix in float64, the table's gathered
rows against the dequantized rows, and ms per product against bfloat16 ``F.linear``;
fp8 rows likewise where the GPU has fp8 (compute capability 8.9+). Then, if a slice
loads on CUDA, SmolLM2 Q4_1 with GGUF weights on the GPU against the same on the CPU:
next-token agreement of the last position's logits for a few prompts.

    python bench/quant_gpu_check.py

Writes ``bench/results/quant_gpu_check.json``; exits 1 if an error bound is exceeded
(int4: 2e-2 relative, the bfloat16 activations and scales; fp8: 6e-2).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.quant.cuda_int4 import to_cuda_int4  # noqa: E402
from molink.quant.fp8 import MIN_CAPABILITY, Fp8Rows  # noqa: E402
from molink.quant.groups import quantize_float  # noqa: E402

logger = logging.getLogger("quant_gpu_check")
ROWS = (1, 7, 32, 200)
SHAPES = {"qkv": (960, 576), "table": (49152, 576)}
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


def model_check(device: torch.device) -> dict[str, Any]:
    """SmolLM2 Q4_1 (GGUF weights) on the GPU against the CPU, last-position top-1."""
    from molink.config import LayerRange
    from molink.models import SeqChunk
    from molink.weights import resolve_model_source
    from tests.helpers.paged_runner import PagedRunner

    source = resolve_model_source(None, quantization="gguf")
    layers = LayerRange(0, source.model_config.num_layers)
    prompts = [[1, 504, 3458, 314, 4649], [19, 1848, 9654, 30, 314, 2593, 28], [504, 20, 30]]
    tops: dict[str, list[int]] = {}
    for where in ("cpu", str(device)):
        try:
            model = source.load_slice(layers, "bfloat16", device=where)
            runner = PagedRunner([model], 16, 16)
            chunks = [SeqChunk(0, len(p), [i]) for i, p in enumerate(prompts)]
            hidden = runner.forward(chunks, [t for p in prompts for t in p])
            ends = torch.tensor([sum(map(len, prompts[: i + 1])) - 1 for i in range(3)])
            tops[where] = model.compute_logits(hidden[ends.to(hidden.device)]).argmax(-1).tolist()
        except Exception as exc:  # the slice's own CUDA support may be missing: report it
            return {"error": f"{where}: {type(exc).__name__}: {exc}"}
    return {"top1": tops, "equal": tops["cpu"] == tops[str(device)]}


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not torch.cuda.is_available():
        logger.error("no CUDA device")
        return 2
    device = torch.device("cuda")
    kernels, ok = kernel_checks(device)
    model = model_check(device)
    write_results(
        "quant_gpu_check",
        {
            "device": torch.cuda.get_device_name(device),
            "capability": list(torch.cuda.get_device_capability(device)),
            "kernels": kernels,
            "within_bounds": ok,
            "model": model,
        },
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
