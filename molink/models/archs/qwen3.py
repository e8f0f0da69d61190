"""Qwen3: Llama with an RMSNorm over each head of q and k, before the rotation."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.archs.llama import Llama
from molink.models.archs.qwen2 import qwen_layer_types


class Qwen3(Llama):
    model_type = "qwen3"
    gguf_permuted_qk = False

    def qk_norm(self, config: ModelConfig) -> str | None:
        return "head"

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def layer_types(self, config: ModelConfig) -> list[str]:
        return qwen_layer_types(config)


ARCHITECTURE = Qwen3()
