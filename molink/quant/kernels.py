"""Which CPU kernel a quantized matrix product runs, chosen per step by its rows.

Candidates measured side by side on one thread of this AVX2 CPU (no AVX-512), one
SmolLM2-135M forward pass (30 layers + LM head, distinct weights streaming from memory),
ms per pass, medians of 5 rounds interleaved candidate by candidate, on a host loaded
~6x by other jobs (bench/quant_kernels.py --interleaved;
bench/results/quant_kernels_fp16.json):

    rows                         1      2      3      4      8     16     32     64
    float32 (MKL)              670   1039    997   1534   2238   2337   3260   3663
    int4 g32 kernel (bf16)     513    527    421    644   1299   2234   3732   6819
    fbgemm float16 packed      498    524    408    465    981   1239   2736   3715
    fbgemm int8 dynamic        292    254    254    336    492    642   1260   1941

and on a quieter host (the same passes, one round each, ms):

    rows                         1      4      8     16     32     64    256
    float32 (MKL)               35    169    108    238    190    382   2396
    int4 g32 kernel             23    103     58    290    242    654   4566
    int4 dequantize + MKL        -   1313      -   1288   1660      -   5042
    fbgemm float16 packed       28     50     50    131    128    235   2901
    int8 per-row kernel         34      -     87      -    316    496      -

torch's ``_weight_int4pack_mm_for_cpu`` (molink.quant.int4) keeps a Q4 file's bytes and
is the fastest at one or two rows; its time grows with the rows (it dequantizes again for
every few rows: compute-bound without AVX-512). fbgemm's float16 GEMM
(molink.quant.fp16_gemm) is 1.2-3.3x float32 from 2 to 32 rows and ties it at 64, but
holds a float16 copy (2 bytes per weight beside the 0.56-0.85 of the int4 planes).
fbgemm's int8 dynamic path loses accuracy (its module doc); ``_weight_int8pack_mm`` is
slower than float32 from 16 rows; oneDNN's packed bfloat16 GEMM refuses this CPU; torchao's CPU int4 layout calls
the same int4 kernel.

So ``--quantized-batch-kernel``:

* ``int4`` (default: weights stay at the file's size): the int4 kernel up to
  ``INT4_MAX_ROWS`` rows, dequantizing a band at a time into MKL above (they tie between
  96 and 128 rows; bench/results/quant_kernels_crossover.json);
* ``fp16``: the int4 kernel up to ``INT4_FEW_ROWS`` rows, fbgemm's float16 copy above
  (decode batches and prefill chunks), for nodes that trade memory for batch speed.
"""

from __future__ import annotations

from typing import Literal

from molink.errors import InvalidParameterError

BATCH_KERNEL_CHOICES = ("int4", "fp16", "int8act")
# Up to this many rows the int4 kernel beats dequantize-and-multiply (table above).
INT4_MAX_ROWS = 128
# With a float16 copy, up to this many rows the int4 kernel ties or wins (tables above).
INT4_FEW_ROWS = 2

Kernel = Literal["int4", "dequant", "fp16", "nbits"]


def check_batch_kernel(value: str) -> None:
    if value not in BATCH_KERNEL_CHOICES:
        raise InvalidParameterError(
            "quantized_batch_kernel", f"{value!r} is not one of {', '.join(BATCH_KERNEL_CHOICES)}"
        )


def choose_kernel(rows: int, batch_kernel: str, planes: int = 1) -> Kernel:
    """The kernel for a product with ``rows`` activation rows, W in ``planes`` int4 planes
    (two run the int4 kernel twice: with a float16 copy at hand, that copy is faster)."""
    if batch_kernel == "fp16":
        return "int4" if rows <= INT4_FEW_ROWS and planes == 1 else "fp16"
    if batch_kernel == "int8act":
        return "nbits"
    return "int4" if rows <= INT4_MAX_ROWS else "dequant"
