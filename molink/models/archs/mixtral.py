"""Mixtral: Mistral's attention, a mixture of SwiGLU experts (softmax, top-k, renormalised)."""

from __future__ import annotations

from typing import Any

from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import Binding, every_layer_slides, expert_bindings
from molink.models.archs.mistral import Mistral
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.moe import MoE, MoESpec


class Mixtral(Mistral):
    model_type = "mixtral"

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        return {
            **cfg,
            "num_local_experts": int(field("expert_count")),
            "num_experts_per_tok": int(field("expert_used_count")),
        }

    def layer_types(self, config: ModelConfig) -> list[str]:
        return every_layer_slides(config)  # Mixtral's code ignores layer_types

    def build_mlp(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        spec = MoESpec(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_experts=int(config.raw["num_local_experts"]),
            top_k=int(config.raw["num_experts_per_tok"]),
        )
        return MoE(spec, factory, activation=self.activation(config))

    def mlp_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index) + "block_sparse_moe."
        experts = int(config.raw["num_local_experts"])
        return [
            Binding("mlp.router", (p + "gate.weight",)),
            *expert_bindings(p + "experts.", experts, "w1", "w3", "w2"),
        ]


ARCHITECTURE = Mixtral()
