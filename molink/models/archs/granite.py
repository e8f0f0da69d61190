"""Granite: Llama with multipliers on the embedding, the attention scores, both residual
branches, and a divisor on the logits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from molink.config import ModelConfig
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import AttentionSpec


def _multiplier(config: ModelConfig, field: str) -> float:
    return float(config.raw.get(field, 1.0))


# GGUF metadata key -> config field; llama.cpp permutes Granite's Q/K rows as Llama's.
_GGUF_MULTIPLIERS = {
    "attention.scale": "attention_multiplier",
    "embedding_scale": "embedding_multiplier",
    "residual_scale": "residual_multiplier",
    "logit_scale": "logits_scaling",
}


class Granite(Llama):
    model_type = "granite"

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        cfg = dict(cfg)
        for key, name in _GGUF_MULTIPLIERS.items():
            value = field(key)
            if value is not None:
                cfg[name] = float(value)
        return cfg

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
