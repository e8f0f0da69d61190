"""Candidates for a Q8_0 matrix product on one CPU thread: SmolLM2's LM head (49152 x 576,
the file's own Q8_0 blocks), at the few rows a decode step has.

Each candidate multiplies the same activations; the reference is the float64 product with
the ``gguf`` package's dequantized matrix. Reported per rows: median ms per product with
the weights out of the CPU's caches (a 256 MiB buffer is written before every product, as
the rest of a model pass streams between two heads), rounds interleaved candidate by
candidate; the relative RMS and max errors of the result; the bytes each keeps. Candidates:

* ``int4_two_calls``: the two int4 planes (high and low nibbles) in two calls of
  ``_weight_int4pack_mm_for_cpu``, added in float32 (the path before ``int4_joined``);
* ``int4_joined``: the same planes joined along the inputs, one call on ``[x | x]``
  (molink.quant.int4.Int4Planes.join_planes: what two-plane layers run);
* ``int4_joined_ties``: the same, with a row's tied top logits recomputed in float32
  (``Int4Planes.logits``: what an LM head runs; the random activations here rarely tie,
  so this is the cost of the check);
* ``int8_rows``: ``_weight_int8pack_mm``, int8 weights with one bfloat16 scale per row
  (Q8_0's 32-weight scales requantized onto the row's largest: lossy);
* ``nbits8_int8act``: onnxruntime's ``MatMulNBits`` 8-bit with the file's integers and
  float32 scales, activations rounded to int8 per block of 32 (llama.cpp's Q8_0 x Q8_0);
* ``fbgemm_fp16`` / ``bf16_onednn``: a float16 / bfloat16 copy (2 bytes per weight);
* ``fp32``: the float32 matrix (exact, 4 bytes per weight).

    OMP_NUM_THREADS=1 python bench/quant_q8_head.py [--rows 1,2,8] [--rounds 15]

Writes ``bench/results/quant_q8_head.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.quant.bf16_gemm import Bf16Packed, bf16_gemm_available  # noqa: E402
from molink.quant.fp16_gemm import Fp16Packed, fp16_gemm_available  # noqa: E402
from molink.quant.gguf_blocks import decode_blocks  # noqa: E402
from molink.quant.groups import GroupInts  # noqa: E402
from molink.quant.int4 import to_int4_planes  # noqa: E402
from molink.quant.nbits import _session, nbits_available  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402

logger = logging.getLogger("quant_q8_head")
Product = Callable[[torch.Tensor], torch.Tensor]


def q8_head() -> tuple[GroupInts, torch.Tensor]:
    """SmolLM2's Q8_0 token embedding (the tied LM head) and gguf's dequantized matrix."""
    import gguf

    reader = gguf.GGUFReader(str(default_model_gguf()))
    tensor = next(t for t in reader.tensors if t.name == "token_embd.weight")
    cols, rows = (int(d) for d in tensor.shape.tolist())
    raw = np.asarray(tensor.data)
    ints = decode_blocks(raw, tensor.tensor_type.name, rows, cols)
    exact = gguf.dequantize(raw, tensor.tensor_type).reshape(rows, cols).astype(np.float32)
    return ints, torch.from_numpy(exact)


def int8_rows(w: torch.Tensor) -> tuple[Product, int]:
    scale = (w.abs().amax(1) / 127).clamp_min(1e-30)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    scale_bf16 = scale.to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, scale_bf16).float()

    return run, q.numel() + scale_bf16.numel() * 2


def nbits8(ints: GroupInts) -> tuple[Product, int]:
    rows, cols = ints.shape
    q = (ints.q + 128).to(torch.uint8).view(rows, cols // ints.group, ints.group)
    session = _session(
        q.contiguous().numpy(), ints.scale.contiguous().numpy(), rows, cols, 8, ints.group
    )

    def run(x: torch.Tensor) -> torch.Tensor:
        (y,) = session.run(None, {"A": x.float().contiguous().numpy()})
        return torch.from_numpy(y)

    return run, q.numel() + ints.scale.numel() * 4


def candidates(ints: GroupInts, w: torch.Tensor) -> dict[str, tuple[Product, int]]:
    planes, joined = to_int4_planes(ints), to_int4_planes(ints)
    joined.join_planes()
    found: dict[str, tuple[Product, int]] = {
        "int4_two_calls": (planes.matmul_float, planes.nbytes),
        "int4_joined": (joined.matmul_float, joined.nbytes),
        "int4_joined_ties": (joined.logits, joined.nbytes),
        "int8_rows": int8_rows(w),
    }
    if nbits_available():
        found["nbits8_int8act"] = nbits8(ints)
    if fp16_gemm_available():
        fp16 = Fp16Packed(w)
        found["fbgemm_fp16"] = (fp16.matmul, w.numel() * 2)
    if bf16_gemm_available():
        bf16 = Bf16Packed(w)
        found["bf16_onednn"] = (bf16.matmul, w.numel() * 2)
    found["fp32"] = (lambda x: F.linear(x, w), w.numel() * 4)
    return found


def errors(y: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = y.double() - ref
    return {
        "rms_rel": float(diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()),
        "max_rel": float(diff.abs().max() / ref.abs().max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,2,8")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--name", default="quant_q8_head")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    ints, w = q8_head()
    found = candidates(ints, w)
    flush = torch.zeros(256 << 18)  # 256 MiB of float32
    load = [os.getloadavg()[0]]
    results: dict[str, Any] = {}
    for rows in (int(n) for n in args.rows.split(",")):
        x = torch.randn(rows, w.shape[1], generator=torch.Generator().manual_seed(rows))
        ref = x.double() @ w.double().t()
        times: dict[str, list[float]] = {name: [] for name in found}
        for _ in range(args.rounds):
            for name, (run, _) in found.items():
                flush.add_(1.0)
                start = time.perf_counter()
                run(x)
                times[name].append((time.perf_counter() - start) * 1e3)
        for name, (run, nbytes) in found.items():
            entry = {"ms": round(statistics.median(times[name]), 3), "bytes": nbytes}
            entry.update({k: float(f"{v:.3e}") for k, v in errors(run(x), ref).items()})
            results.setdefault(name, {})[str(rows)] = entry
            logger.info("rows=%d %s: %s", rows, name, entry)
        load.append(os.getloadavg()[0])
    write_results(
        args.name,
        {
            "matrix": {"rows": w.shape[0], "cols": w.shape[1], "type": "Q8_0"},
            "rounds": args.rounds,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "load_average_1m": [round(v, 2) for v in load],
            "results": results,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
