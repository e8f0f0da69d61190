"""Qwen2-MoE: Qwen2's attention; sparse layers mix routed experts with a gated shared expert."""

from __future__ import annotations

from typing import Any

from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    configured_layer_types,
    expert_bindings,
    gated_mlp_bindings,
)
from molink.models.archs.qwen2 import Qwen2
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.moe import MoE, MoESpec


def num_experts(config: ModelConfig) -> int:
    """Qwen2-MoE's configs say ``num_experts``; newer Qwen3-MoE ones ``num_local_experts``."""
    return int(config.raw.get("num_experts") or config.raw.get("num_local_experts") or 0)


def is_sparse(config: ModelConfig, index: int) -> bool:
    """Qwen-MoE's rule: experts unless listed in mlp_only_layers or off the sparse step."""
    raw = config.raw
    experts = num_experts(config)
    step = int(raw.get("decoder_sparse_step") or 1)
    return (
        index not in (raw.get("mlp_only_layers") or []) and experts > 0 and (index + 1) % step == 0
    )


def qwen_moe_spec(config: ModelConfig, shared: bool) -> MoESpec:
    raw = config.raw
    return MoESpec(
        hidden_size=config.hidden_size,
        intermediate_size=int(raw["moe_intermediate_size"]),
        num_experts=num_experts(config),
        top_k=int(raw["num_experts_per_tok"]),
        normalize=bool(raw.get("norm_topk_prob", False)),
        shared_intermediate=int(raw.get("shared_expert_intermediate_size") or 0) if shared else 0,
        shared_gate=shared,
    )


class Qwen2Moe(Qwen2):
    model_type = "qwen2_moe"
    shared_expert = True
    # llama.cpp renormalises the chosen experts' weights of Qwen3-MoE, not of Qwen2-MoE,
    # unless the file says otherwise.
    gguf_norm_topk = False

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        # Every layer of a llama.cpp file is sparse (its format has no dense MLP here).
        cfg = {
            **cfg,
            "num_experts": int(field("expert_count")),
            "num_experts_per_tok": int(field("expert_used_count")),
            "moe_intermediate_size": int(field("expert_feed_forward_length")),
            "norm_topk_prob": bool(field("expert_weights_norm", self.gguf_norm_topk)),
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        }
        shared = field("expert_shared_feed_forward_length")
        if self.shared_expert and shared:
            cfg["shared_expert_intermediate_size"] = int(shared)
        return cfg

    def qkv_bias(self, config: ModelConfig) -> bool:
        return bool(config.raw.get("qkv_bias", True))  # Qwen2-MoE's own flag, set by default

    def layer_types(self, config: ModelConfig) -> list[str]:
        # transformers' Qwen2-MoE default (unlike Qwen2's): even layers below
        # max_window_layers slide.
        last = int(config.raw.get("max_window_layers", 28))
        return configured_layer_types(config, lambda i: i % 2 == 0 and i < last)

    def build_mlp(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        if not is_sparse(config, index):
            return super().build_mlp(config, index, factory)
        return MoE(
            qwen_moe_spec(config, self.shared_expert), factory, activation=self.activation(config)
        )

    def mlp_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        if not is_sparse(config, index):
            return super().mlp_bindings(config, index)
        p = self.layer_prefix(index) + "mlp."
        bindings = [
            Binding("mlp.router", (p + "gate.weight",)),
            *expert_bindings(
                p + "experts.", num_experts(config), "gate_proj", "up_proj", "down_proj"
            ),
        ]
        if self.shared_expert:
            prefix = self.layer_prefix(index)
            bindings += gated_mlp_bindings(prefix, target="mlp.shared", module="mlp.shared_expert")
            bindings.append(Binding("mlp.shared_gate", (p + "shared_expert_gate.weight",)))
        return bindings


ARCHITECTURE = Qwen2Moe()
