"""Which quantization a stage runs, as vLLM's ``--quantization`` and ``--kv-cache-dtype`` say.

* ``gguf``: a GGUF file's quantized tensors stay quantized (molink.quant.gguf_blocks);
* ``awq`` / ``gptq``: a checkpoint whose ``config.json`` has such a ``quantization_config``;
* ``int4`` / ``int8``: a float checkpoint quantized on the fly at load (group 32);
* ``fp8``: a float checkpoint quantized at load to fp8 rows, on a GPU with fp8 support
  (molink.quant.fp8): refused on CPU; checkpoints stored in fp8 are refused too;
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
    return str(method).lower() if method else "unknown"


def resolve_quantization(
    requested: str | None, detected: str, device: torch.device | str = "cpu"
) -> str:
    """The method to run: ``requested`` if the checkpoint (``detected``) allows it."""
    check_quantization_choice(requested)
    method = detected if requested is None else requested
    if requested is None and detected == "gguf" and torch.device(device).type != "cpu":
        method = "none"  # GGUF's packed kernels here are CPU ones; a GPU runs it dequantized
    if detected not in ("none", "gguf", *CHECKPOINT_METHODS):
        raise InvalidParameterError(
            "quantization_config",
            f"quant_method {detected!r} is not supported; supported: awq, gptq, fp8 "
            "(GPU), or a GGUF file",
        )
    allowed = {"none": ("none", "int4", "int8", "fp8"), "gguf": ("gguf", "none")}.get(
        detected, (detected,)
    )
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
    if detected == "fp8":
        # Their weight_scale tensors are not read: a stored fp8 matrix is refused, not guessed.
        raise InvalidParameterError(
            "quantization_config",
            "checkpoints stored in fp8 are not supported; run the float checkpoint with "
            "--quantization fp8",
        )
    return method


def _describe(detected: str) -> str:
    if detected == "none":
        return "a float checkpoint"
    if detected == "gguf":
        return "a GGUF file"
    return f"quantized with {detected}"


def resolve_kv_cache_dtype(
    requested: str, model_dtype: torch.dtype, device: torch.device | str = "cpu"
) -> torch.dtype:
    """``auto``: the model's dtype; ``fp8`` is refused on CPU (no fp8 attention there)."""
    check_kv_cache_dtype(requested)
    if requested == "auto":
        return model_dtype
    if requested == "fp8":
        if torch.device(device).type == "cpu":
            raise InvalidParameterError(
                "kv_cache_dtype",
                "fp8 KV cache needs a GPU; on cpu use auto, float32 or bfloat16",
            )
        return torch.float8_e4m3fn
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[requested]
