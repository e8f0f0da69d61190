"""Qwen2: Llama with biases on q, k and v (never on the output projection)."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.architecture import configured_layer_types
from molink.models.archs.llama import Llama

_MAX_WINDOW_LAYERS = 28  # transformers' default


def qwen_layer_types(config: ModelConfig) -> list[str]:
    """Without layer_types, layers from ``max_window_layers`` on slide (when the config's
    use_sliding_window leaves it a window)."""
    first = int(config.raw.get("max_window_layers", _MAX_WINDOW_LAYERS))
    return configured_layer_types(config, lambda i: i >= first)


class Qwen2(Llama):
    model_type = "qwen2"
    gguf_permuted_qk = False

    def qkv_bias(self, config: ModelConfig) -> bool:
        return True

    def o_bias(self, config: ModelConfig) -> bool:
        return False

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def layer_types(self, config: ModelConfig) -> list[str]:
        return qwen_layer_types(config)


ARCHITECTURE = Qwen2()
