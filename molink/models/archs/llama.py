"""Llama (1, 2, 3.x with its rope scaling): the pre-norm SwiGLU decoder the others extend."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    DecoderArchitecture,
    attention_bindings,
    gated_mlp_bindings,
    norm_binding,
)
from molink.models.blocks.attention import AttentionSpec, SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import GatedMLP
from molink.models.blocks.norms import RMSNorm
from molink.models.blocks.prenorm import PreNormLayer


def reverse_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows of Q or K)."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


class Llama(DecoderArchitecture):
    # llama.cpp permutes Q/K rows of llama-architecture files only (transformers' GGUF
    # loader undoes it likewise); other families are stored in Hugging Face order.
    gguf_permuted_qk = True

    def gguf_tensor(self, name: str, data: np.ndarray, config: ModelConfig) -> np.ndarray:
        if self.gguf_permuted_qk and ".self_attn.q_proj." in name:
            return reverse_permute(data, config.num_heads)
        if self.gguf_permuted_qk and ".self_attn.k_proj." in name:
            return reverse_permute(data, config.num_kv_heads)
        return data

    def gguf_variant(self, field: Any) -> str | None:
        # Mixtral's files say "llama" (the family files of the other subclasses name
        # themselves); their experts give them away.
        if self.model_type == "llama" and int(field("expert_count") or 0) > 0:
            return "MixtralForCausalLM"
        return None

    def qkv_bias(self, config: ModelConfig) -> bool:
        return config.attention_bias

    def o_bias(self, config: ModelConfig) -> bool:
        return config.attention_bias

    def qk_norm(self, config: ModelConfig) -> str | None:
        return None

    def mlp_bias(self, config: ModelConfig) -> bool:
        return bool(config.raw.get("mlp_bias", False))

    def attention_spec(self, config: ModelConfig, index: int) -> AttentionSpec:
        return AttentionSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            norm_eps=config.rms_norm_eps,
            qkv_bias=self.qkv_bias(config),
            o_bias=self.o_bias(config),
            qk_norm=self.qk_norm(config),
            window=self.layer_window(config, index),
        )

    def build_mlp(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        return GatedMLP(
            config.hidden_size,
            config.intermediate_size,
            self.activation(config),
            factory,
            self.mlp_bias(config),
        )

    def residual_multiplier(self, config: ModelConfig) -> float | None:
        return None

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        dtype, device = factory.dtype, factory.device
        return PreNormLayer(
            SelfAttention(self.attention_spec(config, index), factory),
            self.build_mlp(config, index, factory),
            RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device),
            RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device),
            self.residual_multiplier(config),
        )

    def mlp_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        return gated_mlp_bindings(self.layer_prefix(index), bias=self.mlp_bias(config))

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        return [
            norm_binding("input_norm", p + "input_layernorm.weight"),
            norm_binding("post_norm", p + "post_attention_layernorm.weight"),
            *attention_bindings(
                p,
                qkv_bias=self.qkv_bias(config),
                o_bias=self.o_bias(config),
                qk_norm=self.qk_norm(config) is not None,
            ),
            *self.mlp_bindings(config, index),
        ]


ARCHITECTURE = Llama()
