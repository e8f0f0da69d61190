"""Qwen2: Llama with biases on q, k and v (never on the output projection)."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.archs.llama import Llama


class Qwen2(Llama):
    model_type = "qwen2"
    gguf_permuted_qk = False

    def qkv_bias(self, config: ModelConfig) -> bool:
        return True

    def o_bias(self, config: ModelConfig) -> bool:
        return False

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False


ARCHITECTURE = Qwen2()
