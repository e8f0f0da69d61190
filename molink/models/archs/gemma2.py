"""Gemma 2: ``(1 + w)`` RMSNorms around both branches, GeGLU, the embedding scaled by
sqrt(hidden), soft-capped attention and final logits, sliding and global layers alternating."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    DecoderArchitecture,
    attention_bindings,
    configured_layer_types,
    gated_mlp_bindings,
    norm_binding,
    plus_one,
)
from molink.models.blocks.attention import AttentionSpec, SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import GatedMLP
from molink.models.blocks.norms import RMSNorm
from molink.models.blocks.sandwich import SandwichLayer

# Gemma's turns: roles user/model, a system message folded into the first user turn.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set pending = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{%- set pending.system = text -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' -}}"
    "{%- if pending.system and role == 'user' -%}"
    "{{- pending.system + '\n\n' -}}{%- set pending.system = '' -%}{%- endif -%}"
    "{{- text | trim -}}{{- '<end_of_turn>\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
END_OF_TURN = "<end_of_turn>"


class Gemma2(DecoderArchitecture):
    model_type = "gemma2"
    default_chat_template = GEMMA_CHAT_TEMPLATE
    activation_field = "hidden_activation"
    default_activation = "gelu_pytorch_tanh"

    def embedding_scale(self, config: ModelConfig) -> float | None:
        return config.hidden_size**0.5

    def logits_softcap(self, config: ModelConfig) -> float | None:
        cap = config.raw.get("final_logit_softcapping")
        return float(cap) if cap else None

    def gguf_tensor(self, name: str, data: np.ndarray, config: ModelConfig) -> np.ndarray:
        # llama.cpp stores Gemma's norm weights as 1 + w; the bindings add the 1 again.
        return data - 1 if name.endswith("norm.weight") else data

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        cfg = {
            **cfg,
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": cfg["head_dim"],
        }
        cfg.pop("hidden_act", None)
        window = field("attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
        # Sliding and global layers alternate, starting with a sliding one.
        layers = range(int(cfg["num_hidden_layers"]))
        cfg["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in layers
        ]
        tokens = field("tokenizer.ggml.tokens") or []
        if END_OF_TURN in tokens:  # a chat turn ends there: stop as at the end of text
            cfg["eos_token_id"] = [*cfg["eos_token_id"], tokens.index(END_OF_TURN)]
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = field(key)
            if value:
                cfg[key] = float(value)
        return cfg

    def final_norm_bindings(self, config: ModelConfig) -> list[Binding]:
        return [norm_binding("", "model.norm.weight", plus_one)]

    def layer_types(self, config: ModelConfig) -> list[str]:
        # Without layer_types, sliding and global layers alternate, starting with a sliding one.
        return configured_layer_types(config, lambda i: i % 2 == 0)

    def rope_key(self, config: ModelConfig, index: int) -> str:
        return "default"

    def attention_spec(self, config: ModelConfig, index: int) -> AttentionSpec:
        softcap = self.attention_softcap(config)
        scalar = config.raw.get("query_pre_attn_scalar") or config.head_dim
        return AttentionSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            norm_eps=config.rms_norm_eps,
            qkv_bias=config.attention_bias,
            o_bias=config.attention_bias,
            qk_norm=self.qk_norm(),
            rope=self.rope_key(config, index),
            window=self.layer_window(config, index),
            scale=float(scalar) ** -0.5,
            softcap=softcap,
        )

    def attention_softcap(self, config: ModelConfig) -> float | None:
        cap = config.raw.get("attn_logit_softcapping")
        return float(cap) if cap else None

    def qk_norm(self) -> str | None:
        return None

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, factory.dtype, factory.device)

        mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, self.activation(config), factory
        )
        return SandwichLayer(
            SelfAttention(self.attention_spec(config, index), factory),
            mlp,
            pre_attn_norm=norm(),
            post_attn_norm=norm(),
            pre_mlp_norm=norm(),
            post_mlp_norm=norm(),
        )

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        norms = [
            ("pre_attn_norm", "input_layernorm"),
            ("post_attn_norm", "post_attention_layernorm"),
            ("pre_mlp_norm", "pre_feedforward_layernorm"),
            ("post_mlp_norm", "post_feedforward_layernorm"),
        ]
        bindings = [norm_binding(t, f"{p}{n}.weight", plus_one) for t, n in norms]
        bindings += attention_bindings(
            p, qkv_bias=config.attention_bias, o_bias=config.attention_bias
        )
        if self.qk_norm() is not None:
            a = f"{p}self_attn."
            bindings.append(norm_binding("attn.q_norm", a + "q_norm.weight", plus_one))
            bindings.append(norm_binding("attn.k_norm", a + "k_norm.weight", plus_one))
        return bindings + gated_mlp_bindings(p)


ARCHITECTURE = Gemma2()
