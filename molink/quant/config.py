"""Which quantization a stage runs, as vLLM's ``--quantization`` and ``--kv-cache-dtype`` say.

* ``gguf``: a GGUF file's quantized tensors stay quantized (molink.quant.gguf_blocks);
* ``awq`` / ``gptq``: a checkpoint whose ``config.json`` has such a ``quantization_config``;
* ``int4`` / ``int8``: a float checkpoint quantized on the fly at load (group 32);
* ``fp8``: a float checkpoint quantized at load to fp8 rows, on a GPU with fp8 support
  (molink.quant.fp8): refused on CPU. A checkpoint stored in fp8 (vLLM's ``fp8`` or
  ``compressed-tensors`` with 8-bit float weights) is read as float matrices, each
  ``fp8 x weight_scale`` (molink.weights.fp8_store): held in the compute dtype
  (``none``, the default), or re-quantized (``fp8`` rows on a GPU, ``int4``/``int8``);
* ``none``: float weights (a GGUF file dequantized at load, as before).

Without ``--quantization`` the checkpoint decides: its ``quantization_config`` method, or
``gguf`` for a GGUF file with block-quantized tensors, else ``none``. A method the checkpoint cannot be run as (``awq``
for a GGUF file, ``gguf`` for safetensors, ``int4`` for an already quantized checkpoint)
is refused naming both.
"""

from __future__ import annotations

from typing import Any

import torch

from molink.errors import InvalidParameterError

QUANTIZATION_CHOICES = ("none", "gguf", "awq", "gptq", "fp8", "int4", "int8")
KV_CACHE_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "fp8")
ON_THE_FLY_BITS = {"int4": 4, "int8": 8}
# Checkpoint methods that ship their own integer tensors (and what they are called).
CHECKPOINT_METHODS = ("awq", "gptq", "fp8")


def check_quantization_choice(value: str | None) -> None:
    if value is not None and value not in QUANTIZATION_CHOICES:
        raise InvalidParameterError(
            "quantization", f"{value!r} is not one of {', '.join(QUANTIZATION_CHOICES)}"
        )


def check_kv_cache_dtype(value: str) -> None:
    if value not in KV_CACHE_DTYPE_CHOICES:
        raise InvalidParameterError(
            "kv_cache_dtype", f"{value!r} is not one of {', '.join(KV_CACHE_DTYPE_CHOICES)}"
        )


def checkpoint_method(raw_config: dict[str, Any]) -> str | None:
    quant = raw_config.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "compressed-tensors" and _float8_weights(quant):
        return "fp8"
    return str(method).lower() if method else "unknown"


def _float8_weights(quant: dict[str, Any]) -> bool:
    """compressed-tensors with every group's weights 8-bit floats (llm-compressor's FP8)."""
    groups = quant.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return False
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    return bool(weights) and all(
        w.get("type") == "float" and int(w.get("num_bits", 0)) == 8 for w in weights
    )


def fp8_block(raw_config: dict[str, Any]) -> tuple[int, int] | None:
    """The [rows, cols] block one fp8 scale covers, where the checkpoint scales by block."""
    quant = raw_config.get("quantization_config") or {}
    block = quant.get("weight_block_size")
    for group in (quant.get("config_groups") or {}).values():
        block = block or ((group or {}).get("weights") or {}).get("block_structure")
    if block is None:
        return None
    if len(block) != 2 or min(int(b) for b in block) < 1:
        raise InvalidParameterError(
            "quantization_config.weight_block_size", f"{block!r} is not [rows, cols] >= 1"
        )
    return int(block[0]), int(block[1])


def resolve_quantization(
    requested: str | None, detected: str, device: torch.device | str = "cpu"
) -> str:
    """The method to run: ``requested`` if the checkpoint (``detected``) allows it."""
    check_quantization_choice(requested)
    method = detected if requested is None else requested
    if requested is None and detected == "gguf" and torch.device(device).type != "cpu":
        method = "none"  # GGUF's packed kernels here are CPU ones; a GPU runs it dequantized
    if requested is None and detected == "fp8" and torch.device(device).type == "cpu":
        method = "none"  # no fp8 matrix product on a CPU: stored fp8 runs dequantized
    if detected not in ("none", "gguf", *CHECKPOINT_METHODS):
        raise InvalidParameterError(
            "quantization_config",
            f"quant_method {detected!r} is not supported; supported: awq, gptq, fp8 "
            "(8-bit float weights, vLLM's or compressed-tensors'), or a GGUF file",
        )
    floats = ("none", "int4", "int8", "fp8")
    allowed = {"none": floats, "fp8": floats, "gguf": ("gguf", "none")}.get(detected, (detected,))
    if method not in allowed:
        raise InvalidParameterError(
            "quantization",
            f"{method!r} cannot run this checkpoint, which is {_describe(detected)}; "
            f"possible: {', '.join(allowed)}",
        )
    if method == "fp8" and torch.device(device).type == "cpu":
        raise InvalidParameterError(
            "quantization", "fp8 weights need a GPU with fp8 support; this stage runs on cpu"
        )
    return method


def _describe(detected: str) -> str:
    if detected == "none":
        return "a float checkpoint"
    if detected == "fp8":
        return "stored in fp8"
    if detected == "gguf":
        return "a GGUF file"
    return f"quantized with {detected}"


# A resolved cache dtype by the name --kv-cache-dtype takes for it.
KV_CACHE_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.bfloat16: "bfloat16",
    torch.float8_e4m3fn: "fp8",
}
# Methods whose matrices a CPU multiplies with torch's int4 kernel (molink.quant.int4),
# which takes and gives bfloat16.
INT4_KERNEL_METHODS = ("gguf", "awq", "gptq", "int4", "int8")


def resolve_kv_cache_dtype(
    requested: str,
    model_dtype: torch.dtype,
    device: torch.device | str = "cpu",
    quantization: str = "none",
) -> torch.dtype:
    """``auto``: the model's dtype, except on a CPU whose quantized weights (``quantization``,
    the method that runs) go through the int4 kernel: bfloat16 there. Its products come out
    in bfloat16, so the values are already bfloat16 and the keys differ from float32 only
    by their rotation's rounding; the cache takes half the memory (as llama.cpp's 16-bit
    cache), and SmolLM2 Q4_1's teacher-forced agreement with float32 moves from 1270 to
    1269 of 1280 predictions (tests/unit/test_quant_smollm.py's set). ``fp8`` is refused on
    CPU (no fp8 attention there)."""
    check_kv_cache_dtype(requested)
    if requested == "auto":
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu and quantization in INT4_KERNEL_METHODS and model_dtype == torch.float32:
            return torch.bfloat16
        return model_dtype
    if requested == "fp8":
        if torch.device(device).type == "cpu":
            raise InvalidParameterError(
                "kv_cache_dtype",
                "fp8 KV cache needs a GPU; on cpu use auto, float32 or bfloat16",
            )
        return torch.float8_e4m3fn
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]
