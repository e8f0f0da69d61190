"""The model, HTTP server and engine flags of ``molink serve`` (vLLM's names and meanings).

``EngineArgs`` (molink.cli.args) holds the values and checks them.
"""

from __future__ import annotations

import argparse

from molink.cli.default_model import DEFAULT_MODEL_NAME
from molink.cli.flag_values import max_model_len_arg, size_arg, token_count_arg
from molink.cli.vllm_loading_args import (
    KV_CACHE_DTYPE_ALIASES,
    QUANTIZATION_ALIASES,
    REFUSED_KV_CACHE_DTYPES,
)
from molink.config import ENGINE_DEFAULTS
from molink.device import DEVICE_CHOICES
from molink.quant.config import KV_CACHE_DTYPE_CHOICES, QUANTIZATION_CHOICES
from molink.quant.kernels import BATCH_KERNEL_CHOICES

API_KEY_ENV = "MOLINK_API_KEY"
# vLLM's variable, read after MoLink's: a vLLM deployment that sets only it stays keyed.
VLLM_API_KEY_ENV = "VLLM_API_KEY"
# vLLM's choices: half is float16, float is float32.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "half", "float")
DTYPE_ALIASES = {"half": "float16", "float": "float32"}
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """The "model", "HTTP server" and "engine" groups, with their defaults shown in --help."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"path, GGUF file or hub id (default: the embedded {DEFAULT_MODEL_NAME})",
    )
    model.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        metavar="NAME",
        help="one or more names clients send as 'model'; responses carry the first "
        "(default: the --model value)",
    )
    model.add_argument(
        "--dtype",
        default=ENGINE_DEFAULTS.dtype,
        choices=DTYPE_CHOICES,
        help="weight and activation dtype; auto: the checkpoint's on a GPU, float32 or "
        "bfloat16 on a CPU (default: %(default)s)",
    )
    model.add_argument(
        "--device",
        default=ENGINE_DEFAULTS.device,
        metavar="{" + ",".join(DEVICE_CHOICES) + "}",
        help="where this node computes; auto: the first CUDA device if torch sees one, "
        "else the CPU (default: %(default)s)",
    )
    model.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=(*QUANTIZATION_CHOICES, *QUANTIZATION_ALIASES),
        help="how weights are held: gguf/awq/gptq as the checkpoint is (vLLM's awq_marlin "
        "and gptq_marlin are awq and gptq), int4/int8 quantized at load, none for float "
        "(default: detected from the checkpoint)",
    )
    model.add_argument(
        "--quantized-batch-kernel",
        default=ENGINE_DEFAULTS.quantized_batch_kernel,
        choices=BATCH_KERNEL_CHOICES,
        help="how quantized weights multiply batches of more than 2 rows: int4 keeps only "
        "the quantized weights; fp16 adds a float16 copy (2 bytes per weight) that is "
        "1.4-3x faster than float32 from 4 rows up; bf16 adds a bfloat16 copy instead, "
        "faster still on CPUs with bfloat16 dot products (AVX-512 BF16, AMX); int8act is "
        "fp16 with attention's "
        "output and the MLP's down projection in int8 activations x int4/int8 weights "
        "(onnxruntime) (default: %(default)s)",
    )
    model.add_argument(
        "--kv-cache-dtype",
        default=ENGINE_DEFAULTS.kv_cache_dtype,
        choices=(*KV_CACHE_DTYPE_CHOICES, *KV_CACHE_DTYPE_ALIASES, *REFUSED_KV_CACHE_DTYPES),
        help="KV cache dtype; auto: the model dtype (bfloat16 for weights kept quantized "
        "on a CPU); bfloat16 halves CPU cache memory; fp8 (fp8_e4m3) needs a GPU; "
        "fp8_e5m2 is refused (default: %(default)s)",
    )
    model.add_argument(
        "--max-model-len",
        type=max_model_len_arg,
        default=None,
        help="context length in tokens, e.g. 4096, 4k (4000) or 4K (4096) (default: the "
        "model's own)",
    )
    model.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks that split this stage's layers by heads and rows: GPUs (NCCL) or CPU "
        "processes (gloo) of this machine; each stage of a pipeline picks its own "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--seed", type=int, default=0, help="seed of the random generators (default: %(default)s)"
    )

    server = parser.add_argument_group("HTTP server")
    server.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default: %(default)s)"
    )
    server.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else "
        f"${VLLM_API_KEY_ENV}, else none)",
    )
    server.add_argument(
        "--log-level", default="info", choices=LOG_LEVEL_CHOICES, help="(default: %(default)s)"
    )

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-num-seqs",
        type=int,
        default=ENGINE_DEFAULTS.max_num_seqs,
        help="most sequences in one batch (default: %(default)s)",
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=token_count_arg,
        default=ENGINE_DEFAULTS.max_num_batched_tokens,
        help="most tokens in one step (default: %(default)s)",
    )
    engine.add_argument(
        "--block-size",
        type=int,
        default=ENGINE_DEFAULTS.block_size,
        help="tokens per KV-cache block (default: %(default)s)",
    )
    engine.add_argument(
        "--kv-cache-memory",
        type=size_arg,
        default=None,
        help="KV-cache size, e.g. 512MiB, 2GiB or bytes (default: automatic, "
        f"{ENGINE_DEFAULTS.kv_cache_memory_bytes // 2**20}MiB on a CPU)",
    )
    engine.add_argument(
        "--kv-cache-memory-bytes",
        dest="kv_cache_memory",
        type=token_count_arg,  # vLLM's reading: 4G is 4 GiB, 4g 4e9 bytes
        default=None,
        help="vLLM's name for --kv-cache-memory, in bytes (as vLLM reads 4G or 4g)",
    )
    engine.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
