"""Cohere (Command-R): one bias-free LayerNorm feeding attention and MLP in parallel,
rotary over interleaved pairs, optional per-head q/k LayerNorms, scaled logits."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    attention_bindings,
    default_rope_spec,
    gated_mlp_bindings,
    norm_binding,
)
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import GatedMLP
from molink.models.blocks.norms import LayerNorm
from molink.models.forward_context import ForwardContext
from molink.models.rope import RopeSpec


class ParallelLayer(nn.Module):
    """``x + attn(norm(x)) + mlp(norm(x))``."""

    def __init__(self, norm: nn.Module, attn: SelfAttention, mlp: GatedMLP) -> None:
        super().__init__()
        self.input_norm = norm
        self.attn = attn
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        h = self.input_norm(x)
        heads = self.attn(h, ctx, key_cache, value_cache)
        return self.mlp.add_to(self.attn.o.add_to(x, heads), h)


def _norm(config: ModelConfig, factory: LinearFactory) -> LayerNorm:
    shape = (config.hidden_size,)
    return LayerNorm(shape, config.rms_norm_eps, False, factory.dtype, factory.device)


class Cohere(Llama):
    model_type = "cohere"
    gguf_permuted_qk = False  # Cohere rotates adjacent pairs, as llama.cpp does

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        return {
            **cfg,
            "layer_norm_eps": cfg["rms_norm_eps"],
            "logit_scale": float(field("logit_scale", 1.0)),
            "use_qk_norm": field.has_tensor("blk.0.attn_q_norm.weight"),
        }

    def qk_norm(self, config: ModelConfig) -> str | None:
        return "head_layernorm" if config.raw.get("use_qk_norm") else None

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        return {"default": default_rope_spec(config, interleaved=True)}

    def logits_scale(self, config: ModelConfig) -> float | None:
        return float(config.raw.get("logit_scale", 1.0))

    def build_final_norm(self, config: ModelConfig, factory: LinearFactory) -> nn.Module:
        return _norm(config, factory)

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, self.activation(config), factory
        )
        attn = SelfAttention(self.attention_spec(config, index), factory)
        return ParallelLayer(_norm(config, factory), attn, mlp)

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        bias = config.attention_bias
        return [
            norm_binding("input_norm", p + "input_layernorm.weight"),
            *attention_bindings(
                p, qkv_bias=bias, o_bias=bias, qk_norm=self.qk_norm(config) is not None
            ),
            *gated_mlp_bindings(p),
        ]


ARCHITECTURE = Cohere()
