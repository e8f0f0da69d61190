"""One decoder layer (pre-norm attention + SwiGLU MLP) with fused projections.

q/k/v are one matmul (``qkv_weight``), gate/up another (``gate_up_weight``); both are
concatenated at load time from the checkpoint's separate tensors (see molink.models.loading).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.config import ModelConfig
from molink.models.attention import AttentionMetadata, paged_attention
from molink.models.cpu_linear import add_linear, linear, prepack
from molink.models.rope import apply_rotary


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    if len(shape) == 2:
        return matrix_param(shape[0], shape[1], dtype, device)
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


def matrix_param(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A [rows, cols] weight stored column-major (a transposed view of [cols, rows]).

    ``F.linear(x, w)`` computes ``x @ w.T``; with this layout ``w.T`` is contiguous, which
    MKL runs faster for few rows: about 15% for batch-1 decode and twice as fast for the
    LM head at 8 rows. (2-32 rows use oneDNN-packed copies where available; see cpu_linear.)
    """
    storage = torch.empty((cols, rows), dtype=dtype, device=device)
    return nn.Parameter(storage.t(), requires_grad=False)


def _optional_param(
    present: bool, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> nn.Parameter | None:
    return _param(shape, dtype, device) if present else None


def attention_has_output_bias(config: ModelConfig) -> bool:
    """Llama and Qwen3 put ``attention_bias`` on all four projections; Qwen2 only on q/k/v."""
    return config.attention_bias and config.architecture in ("LlamaForCausalLM", "Qwen3ForCausalLM")


def attention_has_qkv_bias(config: ModelConfig) -> bool:
    # Mistral never has projection biases, whatever its config says.
    return config.attention_bias and config.architecture != "MistralForCausalLM"


def mlp_has_bias(config: ModelConfig) -> bool:
    return config.architecture == "LlamaForCausalLM" and bool(config.raw.get("mlp_bias", False))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = head_dim
        self.q_size = config.num_heads * head_dim
        self.kv_size = config.num_kv_heads * head_dim
        self.intermediate = config.intermediate_size
        self.eps = config.rms_norm_eps
        self.norm_shape = (hidden,)
        self.head_norm_shape = (head_dim,)
        qkv_out = self.q_size + 2 * self.kv_size
        mlp_bias = mlp_has_bias(config)
        self.input_norm = _param((hidden,), dtype, device)
        self.qkv_weight = _param((qkv_out, hidden), dtype, device)
        self.qkv_bias = _optional_param(attention_has_qkv_bias(config), (qkv_out,), dtype, device)
        self.q_norm = _optional_param(config.qk_norm, (head_dim,), dtype, device)
        self.k_norm = _optional_param(config.qk_norm, (head_dim,), dtype, device)
        self.o_weight = _param((hidden, self.q_size), dtype, device)
        self.o_bias = _optional_param(attention_has_output_bias(config), (hidden,), dtype, device)
        self.post_norm = _param((hidden,), dtype, device)
        self.gate_up_weight = _param((2 * self.intermediate, hidden), dtype, device)
        self.gate_up_bias = _optional_param(mlp_bias, (2 * self.intermediate,), dtype, device)
        self.down_weight = _param((hidden, self.intermediate), dtype, device)
        self.down_bias = _optional_param(mlp_bias, (hidden,), dtype, device)
        # oneDNN copies of the matrices (see molink.models.cpu_linear); not in state_dict.
        self.qkv_packed: torch.Tensor | None = None
        self.o_packed: torch.Tensor | None = None
        self.gate_up_packed: torch.Tensor | None = None
        self.down_packed: torch.Tensor | None = None

    def prepack(self, enable: bool = True) -> None:
        """Keep oneDNN-packed copies of the matrices for small batches (or drop them)."""
        pack = prepack if enable else (lambda weight: None)
        self.qkv_packed = pack(self.qkv_weight)
        self.o_packed = pack(self.o_weight)
        self.gate_up_packed = pack(self.gate_up_weight)
        self.down_packed = pack(self.down_weight)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        meta: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """x: [T, hidden] residual stream in, residual stream out."""
        h = F.rms_norm(x, self.norm_shape, self.input_norm, self.eps)
        attn = self._attention(h, cos, sin_signed, meta, key_cache, value_cache)
        x = add_linear(x, attn, self.o_weight, self.o_packed, self.o_bias)
        h = F.rms_norm(x, self.norm_shape, self.post_norm, self.eps)
        gate_up = linear(h, self.gate_up_weight, self.gate_up_packed, self.gate_up_bias)
        act = F.silu(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
        return add_linear(x, act, self.down_weight, self.down_packed, self.down_bias)

    def _attention(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        meta: AttentionMetadata,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens = h.shape[0]
        qkv = linear(h, self.qkv_weight, self.qkv_packed, self.qkv_bias)
        half = self.head_dim // 2
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, -1)
        if self.q_norm is None:
            # q and k rotate together: one set of kernels for both.
            qk = qkv[:, : self.q_size + self.kv_size].view(num_tokens, -1, self.head_dim)
            qk = apply_rotary(qk, cos, sin_signed, half)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        else:
            q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, self.head_dim)
            k = qkv[:, self.q_size : self.q_size + self.kv_size]
            k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
            q = F.rms_norm(q, self.head_norm_shape, self.q_norm, self.eps)
            k = F.rms_norm(k, self.head_norm_shape, self.k_norm, self.eps)
            q = apply_rotary(q, cos, sin_signed, half)
            k = apply_rotary(k, cos, sin_signed, half)
        return paged_attention(q, k, v, key_cache, value_cache, meta)
