"""Granite: Llama with multipliers on the embedding, the attention scores, both residual
branches, and a divisor on the logits."""

from __future__ import annotations

from dataclasses import replace

from molink.config import ModelConfig
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import AttentionSpec


def _multiplier(config: ModelConfig, field: str) -> float:
    return float(config.raw.get(field, 1.0))


class Granite(Llama):
    def embedding_scale(self, config: ModelConfig) -> float | None:
        return _multiplier(config, "embedding_multiplier")

    def logits_scale(self, config: ModelConfig) -> float | None:
        return 1.0 / _multiplier(config, "logits_scaling")

    def residual_multiplier(self, config: ModelConfig) -> float | None:
        return _multiplier(config, "residual_multiplier")

    def attention_spec(self, config: ModelConfig, index: int) -> AttentionSpec:
        spec = super().attention_spec(config, index)
        return replace(spec, scale=_multiplier(config, "attention_multiplier"))


ARCHITECTURE = Granite()
