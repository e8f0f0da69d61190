"""Which CPU kernel a quantized matrix product runs, chosen per step by its rows.

Candidates measured side by side on one thread of an AVX2 CPU (no AVX-512), one
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

onnxruntime's ``MatMulNBits`` (molink.quant.nbits: the same int4 planes, activations
rounded to int8 per block of 32 and multiplied in integers, as llama.cpp's Q4 x Q8 dot
products) on the same model pass, ms, medians of 3 interleaved rounds, on a host loaded
~3x (first) and ~5x (bench/results/quant_kernels_nbits.json):

    rows                         1      8     32        1      8     32
    float32 (oneDNN packed)     60    122    323      289    481   1030
    int4 g32 kernel             30     97    378      162    469   1521
    fbgemm float16 packed       20     56    233      141    220    798
    MatMulNBits int4 x int8     18     43    206      135    280    844

It is the fastest at one row and ties fbgemm's float16 from 8 rows (the order there
changes with the host's load), and int8 activations lose the outlier channels of
normalised hidden states: SmolLM2 Q4_1's teacher-forced top-1 agreement with float32 is
96.3% with every matrix in int8, 98.8% with only attention's output and the MLP's down
projection in int8 (tests/unit/test_quant_smollm.py), under the issue's 98.2% otherwise.

On a CPU with AVX-512 and ``avx512_bf16`` (AMD EPYC, 2 cores) the int4 kernel and
bfloat16 products take faster paths, and the order changes. The same model pass, ms, one
thread, medians of 3 interleaved rounds, load average 0.8
(bench/results/quant_kernels_avx512bf16.json):

    rows                         1      2      4      8     16     32     64
    float32 (oneDNN packed)     20     20     21     29     39     57     99
    bfloat16 (F.linear)         21     21     22     26     31     40     62
    int4 g32 kernel            6.7    7.0    9.3     18     32     60    131
    fbgemm float16 packed       11     12     13     17     29     51    102
    MatMulNBits int4 x int8    7.8    8.8     13     20     33     55    108

There the int4 kernel is 2.9x float32 at one row and still the fastest up to 4 rows (so
``INT4_FEW_ROWS`` = 2, chosen on AVX2, hands rows 3-8 to float16 where int4 ties or wins),
ties float16 at 8, and is slower than float32 from 32 rows (0.95x; 0.76x at 64);
bfloat16 weights are the fastest from 32 rows (1.4x float32 at 32, 1.6x at 64), and no
``--quantized-batch-kernel`` uses them. Decode steps of the offline engine split the same way
(bench/results/quant_step_breakdown_avx512bf16.json, load 1.1): products at 1, 8 and 32
rows take 23.6, 23.9, 47.7 ms in float32, 23.6, 26.7, 40.5 in bfloat16, 8.6, 21.8, 84.2
with ``int4``, 8.2, 15.8, 56.0 with ``fp16``, 10.8, 18.0, 55.2 with ``int8act``; whole
steps are 2.5x, 1.2x, 0.75x float32's with ``int4`` and 2.6x, 1.6x, 0.99x with ``fp16``.
Served (bench/results/quant_serving_avx512bf16_run2.json, 4 ABBA rounds, load 0.6-1.3)
``int4`` makes 2.35x, 1.22x, 0.78x float32's tok/s at 1, 8, 32 streams (2.62x, 1.36x,
0.62x bfloat16's), ``fp16`` 2.49x, 1.46x, 1.26x (2.77x, 1.62x, 1.01x), ``int8act`` 2.17x,
1.47x, 1.14x; on a host loaded 3.6-6.5 (quant_serving_avx512bf16.json) ``int4`` 1.87x,
1.20x, 0.78x and ``fp16`` 2.64x, 1.50x, 1.74x. The issue's 2x holds at one stream only,
there as on AVX2. ``int4`` stays the default for its memory (peak 1055 MiB served against
1479 with ``fp16``), though on the AVX-512 CPU ``fp16`` is faster at every stream count.

oneDNN's packed bfloat16 GEMM, which refused the AVX2 CPU, runs on this one with its
bfloat16 dot products (molink.quant.bf16_gemm). Side by side, ms per model pass, one thread,
medians of 3 interleaved rounds, load ~1.7 (bench/results/quant_kernels_bf16.json):

    rows                         1      2      4      6      8     16     32     64
    int4 g32 kernel            6.7    7.1    8.7   14.3   16.0   30.4   57.5  112.7
    bfloat16 packed (oneDNN)  11.6   12.6   12.4   14.5   16.4   22.9   32.4   52.9
    fbgemm float16 packed     10.5   11.3   12.4   15.0   16.5   27.2   49.8   93.8
    float32 (oneDNN packed)   17.9   18.7   19.0   21.4   25.5   36.5   54.5   89.9

The int4 kernel leads up to 4 rows, the three tie from 6 to 8 (bytes decide), and the
bfloat16 copy leads from 16 rows (1.7x float32 at 32 and 64, 1.5-1.8x float16).
Served (bench/results/quant_serving_bf16_kernel.json, 4 ABBA rounds, load ~1.5) ``bf16``
makes 2.24x, 1.60x, 1.59x float32's tok/s at 1, 8, 32 streams (66.2, 266.4, 464.4 against
29.5, 166.7, 292.7), ahead of ``fp16`` (2.06x, 1.40x, 1.12x) and ``int4`` (2.10x, 1.26x,
0.78x), with a smaller peak (1259 MiB against fp16's 1431; int4 982, float32 2178).

What bounds a quantized step against float32 at 8 and 32 rows: the same model pass, every
candidate of this torch pin side by side, one thread, medians of 5 interleaved rounds, load
0.2-0.4 (bench/results/quant_kernels_bound.json), ms:

    rows                         1      8     32
    int4 g32 kernel            6.3   15.3   54.2
    bfloat16 packed (oneDNN)  11.8   16.3   30.3
    fbgemm float16 packed     11.3   15.9   47.6
    MatMulNBits int4 x int8    7.6   18.3   50.1
    float32 (oneDNN packed)   18.4   24.7   51.8

The fastest products are 2.9x float32's at one row, 1.6x at 8 (int4) and 1.7x at 32 (the
bfloat16 copy; int4 0.96x). The rest of a step (attention, norms, sampling) is the same
work in either, so a step of 8 or 32 rows cannot reach 2x float32's with any of them: the
products alone do not. At one row the int4 kernel's 6.3 ms is about llama-server's whole
token on this host (TPOT 6.3-7.4 ms served, bench/quant_serving.py).

So ``--quantized-batch-kernel``:

* ``int4`` (default: weights stay at the file's size): the int4 kernel up to
  ``INT4_MAX_ROWS`` rows, dequantizing a band at a time into MKL above (they tie between
  96 and 128 rows on the AVX2 CPU; bench/results/quant_kernels_crossover.json). On a CPU
  with bfloat16 dot products the int4 kernel stays ahead at every size a step multiplies
  (prefill chunks included), so it has no row limit there (``int4_row_limit``);
* ``fp16``: the int4 kernel up to ``INT4_FEW_ROWS`` rows (``INT4_FEW_ROWS_BF16`` on a CPU
  with bfloat16 dot products), fbgemm's float16 copy above
  (decode batches and prefill chunks), for nodes that trade memory for batch speed; a
  matrix of two planes (Q5, Q6_K, Q8_0: SmolLM2's LM head) takes the float16 copy at
  every row count (the int4 kernel runs twice for it);
* ``bf16``: the int4 kernel up to ``INT4_FEW_ROWS_BF16`` rows, a oneDNN-packed bfloat16
  copy above (2 bytes per weight, as ``fp16``): the fastest on CPUs that multiply
  bfloat16 natively (avx512_bf16, AMX); elsewhere oneDNN emulates it (use ``fp16``);
* ``int8act``: ``fp16``, except attention's output and the MLP's down projection
  (molink.quant.factory's row matrices), which run ``MatMulNBits`` at every row count.
"""

from __future__ import annotations

import sys
from typing import Literal

from molink.errors import InvalidParameterError
from molink.models.cpu_linear import native_bf16

BATCH_KERNEL_CHOICES = ("int4", "fp16", "bf16", "int8act")
# Up to this many rows the int4 kernel beats dequantize-and-multiply (table above).
INT4_MAX_ROWS = 128
# Where the CPU multiplies bfloat16 natively the int4 kernel leads the dequantizing path
# at every size (SmolLM2's 30 layers' products, one thread, AMD EPYC with avx512_bf16,
# medians of 3 interleaved rounds, ms at 64, 128, 256, 512, 1,024, 2,048 rows: 106, 205,
# 405, 864, 1751, 3495 against 277, 452, 800, 1581, 3257, 7564;
# bench/results/quant_kernels_crossover_avx512bf16.json): no limit there.
UNLIMITED_ROWS = sys.maxsize
# With a float16 copy, up to this many rows the int4 kernel ties or wins (tables above).
INT4_FEW_ROWS = 2
# On a CPU with bfloat16 dot products the int4 kernel is faster and wins up to this many
# rows against either copy (8.7 ms at 4 rows against 12.4 for both; table above).
INT4_FEW_ROWS_BF16 = 4

Kernel = Literal["int4", "dequant", "fp16", "bf16", "nbits"]


def check_batch_kernel(value: str) -> None:
    if value not in BATCH_KERNEL_CHOICES:
        raise InvalidParameterError(
            "quantized_batch_kernel", f"{value!r} is not one of {', '.join(BATCH_KERNEL_CHOICES)}"
        )


def int4_max_rows(batch_kernel: str, planes: int = 1) -> int:
    """The most rows ``choose_kernel`` hands to the int4 kernel (0: it never does). A layer
    reads it once at load so that a decode step's products skip the choice."""
    if batch_kernel == "int8act" or (batch_kernel in ("fp16", "bf16") and planes != 1):
        return 0
    if batch_kernel == "fp16":
        return INT4_FEW_ROWS_BF16 if native_bf16() else INT4_FEW_ROWS
    if batch_kernel == "bf16":
        return INT4_FEW_ROWS_BF16
    return int4_row_limit()


def int4_row_limit() -> int:
    """The most rows the ``int4`` choice multiplies with the int4 kernel (above: dequant)."""
    return UNLIMITED_ROWS if native_bf16() else INT4_MAX_ROWS


def choose_kernel(rows: int, batch_kernel: str, planes: int = 1) -> Kernel:
    """The kernel for a product with ``rows`` activation rows, W in ``planes`` int4 planes
    (two run the int4 kernel twice: with a float16 copy at hand, that copy is faster)."""
    if batch_kernel == "fp16":
        few = INT4_FEW_ROWS_BF16 if native_bf16() else INT4_FEW_ROWS
        return "int4" if rows <= few and planes == 1 else "fp16"
    if batch_kernel == "bf16":
        return "int4" if rows <= INT4_FEW_ROWS_BF16 and planes == 1 else "bf16"
    if batch_kernel == "int8act":
        return "nbits"
    return "int4" if rows <= int4_row_limit() else "dequant"
