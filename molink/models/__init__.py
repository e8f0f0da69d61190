"""Plain-PyTorch decoders, one file per architecture (molink/models/archs), run as layer slices.

``build_model`` returns a :class:`DecoderSlice` with uninitialised weights; fill it with
``load_checkpoint_tensors`` (molink.weights does this from safetensors or GGUF files).

Torch is imported on first use of a model class, so that parsing a config (which needs
only :mod:`molink.models.registry`) stays cheap for parts that never run a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from molink.models.registry import SUPPORTED_ARCHITECTURES, resolve_architecture

if TYPE_CHECKING:
    import torch

    from molink.config import LayerRange, ModelConfig
    from molink.models.attention_metadata import AttentionMetadata, SeqChunk
    from molink.models.decoder import DecoderSlice
    from molink.models.kv_cache import KVCache
    from molink.models.loading import checkpoint_tensor_names

_LAZY = {
    "AttentionMetadata": "molink.models.attention_metadata",
    "SeqChunk": "molink.models.attention_metadata",
    "DecoderSlice": "molink.models.decoder",
    "checkpoint_tensor_names": "molink.models.loading",
    "KVCache": "molink.models.kv_cache",
}

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionMetadata",
    "DecoderSlice",
    "KVCache",
    "SeqChunk",
    "build_model",
    "checkpoint_tensor_names",
    "resolve_architecture",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'molink.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def build_model(
    config: ModelConfig,
    layer_range: LayerRange,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> DecoderSlice:
    """An empty slice for ``layer_range`` of ``config`` (weights still to be loaded)."""
    from molink.models.decoder import DecoderSlice

    return DecoderSlice(config, layer_range, dtype, device)
