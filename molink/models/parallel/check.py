"""What a tensor-parallel size must satisfy, checked at start, and each rank's KV layout."""

from __future__ import annotations

import dataclasses

from molink.config import ModelConfig
from molink.errors import InvalidParameterError
from molink.models.parallel.shard import local_units, split_units
from molink.models.registry import architecture_for

# Methods whose matrices a rank can hold in part (molink.quant.parallel): float, GGUF
# blocks and on-the-fly int4/int8; AWQ/GPTQ's packed int32 columns and fp8 blocks are not
# cut.
SPLITTABLE_METHODS = ("none", "gguf", "int4", "int8")


def check_tensor_parallel(config: ModelConfig, size: int, quantization: str = "none") -> None:
    """Refuse, naming both numbers, a size that does not split this model's heads."""
    if size < 1:
        raise InvalidParameterError("tensor_parallel_size", f"must be >= 1, got {size}")
    if size == 1:
        return
    reason = architecture_for(config).tensor_parallel_refusal(config)
    if reason is not None:
        raise InvalidParameterError(
            "tensor_parallel_size", f"{size}: {config.architecture or 'this model'}: {reason}"
        )
    if quantization not in SPLITTABLE_METHODS:
        raise InvalidParameterError(
            "tensor_parallel_size",
            f"{size}: {quantization} weights are not split across ranks (these are: "
            f"{', '.join(SPLITTABLE_METHODS)}); serve them with --tensor-parallel-size 1",
        )
    check_heads(config, size)


def check_heads(config: ModelConfig, size: int) -> None:
    split_units(config.num_heads, size, "attention heads")
    local_units(config.num_kv_heads, size, 0, "key/value heads")


def rank_kv_config(config: ModelConfig, size: int) -> ModelConfig:
    """The config whose KV layout one rank's cache holds: its share of the KV heads (one,
    replicated, when the model has fewer KV heads than ranks)."""
    if size == 1:
        return config
    check_heads(config, size)
    first, last = local_units(config.num_kv_heads, size, 0, "key/value heads")
    return dataclasses.replace(config, num_kv_heads=last - first)
