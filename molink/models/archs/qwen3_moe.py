"""Qwen3-MoE: Qwen3's attention (per-head q/k norms); sparse layers of routed experts only."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.architecture import every_layer_slides
from molink.models.archs.qwen2_moe import Qwen2Moe


class Qwen3Moe(Qwen2Moe):
    model_type = "qwen3_moe"
    shared_expert = False
    gguf_norm_topk = True

    def qkv_bias(self, config: ModelConfig) -> bool:
        return config.attention_bias

    def o_bias(self, config: ModelConfig) -> bool:
        return config.attention_bias

    def qk_norm(self, config: ModelConfig) -> str | None:
        return "head"

    def layer_types(self, config: ModelConfig) -> list[str]:
        return every_layer_slides(config)  # Qwen3-MoE has no layer_types


ARCHITECTURE = Qwen3Moe()
