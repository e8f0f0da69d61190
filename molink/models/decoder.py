"""A contiguous slice ``[start, end)`` of a Llama-family decoder.

The first slice embeds token ids; the last applies the final norm and holds the LM head.
Hidden states cross the seams between slices as [T, hidden] tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from molink.config import LayerRange, ModelConfig
from molink.errors import InvalidParameterError, WeightLoadError
from molink.models.attention import AttentionMetadata
from molink.models.cpu_linear import linear, prepack
from molink.models.kv_cache import KVCache
from molink.models.layers import (
    DecoderLayer,
    attention_has_output_bias,
    attention_has_qkv_bias,
    matrix_param,
    mlp_has_bias,
)
from molink.models.rope import RotaryTables

logger = logging.getLogger(__name__)

# Above this much matrix memory a slice does not keep a second, oneDNN-packed copy.
PREPACK_MAX_BYTES = 4 << 30

EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"


def _check_activation(config: ModelConfig) -> None:
    act = config.raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise InvalidParameterError("hidden_act", f"{act!r} is not supported; supported: silu")


class DecoderSlice(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_range: LayerRange,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        layer_range.validate(config.num_layers)
        _check_activation(config)
        device = torch.device(device)
        self.config = config
        self.layer_range = layer_range
        self.dtype = dtype
        self.is_first = layer_range.is_first()
        self.is_last = layer_range.is_last(config.num_layers)
        self.sliding_window = config.sliding_window
        hidden = config.hidden_size
        self.embed: nn.Parameter | None = None
        if self.is_first:
            self.embed = matrix_param(config.vocab_size, hidden, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(config, dtype, device) for _ in range(layer_range.start, layer_range.end)
        )
        self.final_norm: nn.Parameter | None = None
        self.lm_head: nn.Parameter | None = None
        if self.is_last:
            self.final_norm = nn.Parameter(
                torch.empty(hidden, dtype=dtype, device=device), requires_grad=False
            )
            if config.tie_word_embeddings and self.embed is not None:
                self.lm_head = self.embed  # one tensor serves both ends
            else:
                self.lm_head = matrix_param(config.vocab_size, hidden, dtype, device)
        self.rotary = RotaryTables(config, dtype, device)
        self.lm_head_packed: torch.Tensor | None = None

    @property
    def num_local_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_norm.device

    def forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """Run this slice's layers over one flattened batch.

        ``inputs`` are token ids [T] on the first slice, hidden states [T, hidden] after it.
        Returns [T, hidden]; on the last slice already through the final norm.
        """
        with torch.inference_mode():
            return self._forward(inputs, meta, kv_cache)

    def _forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        if kv_cache.num_layers != len(self.layers):
            raise InvalidParameterError(
                "kv_cache",
                f"holds {kv_cache.num_layers} layers, this slice runs {len(self.layers)}",
            )
        if self.embed is not None:
            x = F.embedding(inputs, self.embed)
        else:
            x = inputs.to(self.dtype)
        if self.sliding_window is not None and meta.max_context_len > self.sliding_window:
            meta = meta.with_sliding_window(self.sliding_window)
        cos, sin_signed = self.rotary.lookup(meta.positions)
        keys, values = kv_cache.keys, kv_cache.values
        for index, layer in enumerate(self.layers):
            x = layer(x, cos, sin_signed, meta, keys[index], values[index])
        if self.final_norm is not None:
            x = F.rms_norm(x, (x.shape[-1],), self.final_norm, self.config.rms_norm_eps)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for final hidden states [N, hidden] (last slice only)."""
        if self.lm_head is None:
            raise InvalidParameterError(
                "compute_logits", "only the slice that ends at the last layer has the LM head"
            )
        with torch.inference_mode():
            return linear(hidden.to(self.dtype), self.lm_head, self.lm_head_packed, None).float()

    # --- weights -----------------------------------------------------------------------

    def checkpoint_tensor_names(self) -> list[str]:
        """Hugging Face tensor names this slice reads, and nothing more."""
        return checkpoint_tensor_names(self.config, self.layer_range)

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill this slice from Hugging Face-named tensors, fusing q/k/v and gate/up."""
        with torch.no_grad():
            if self.embed is not None:
                _copy(self.embed, tensors, EMBED_NAME)
            for index, layer in enumerate(self.layers):
                _load_layer(layer, tensors, f"model.layers.{self.layer_range.start + index}.")
            if self.final_norm is not None:
                _copy(self.final_norm, tensors, FINAL_NORM_NAME)
            if self.lm_head is not None and self.lm_head is not self.embed:
                _copy(self.lm_head, tensors, _head_source(self.config))
        self.prepack()

    def prepack(self, enable: bool = True) -> None:
        """Keep oneDNN-packed copies of the matrices, for decode batches of 2-32 rows on CPU.

        Done after loading when the slice runs in float32 on CPU and its matrices take at
        most ``PREPACK_MAX_BYTES`` (the copies double that memory); ``prepack(False)``
        drops them.
        """
        size = sum(p.numel() * p.element_size() for p in self.parameters() if p.dim() == 2)
        enable = enable and size <= PREPACK_MAX_BYTES
        for layer in self.layers:
            layer.prepack(enable)
        self.lm_head_packed = prepack(self.lm_head) if enable and self.lm_head is not None else None


def _head_source(config: ModelConfig) -> str:
    return EMBED_NAME if config.tie_word_embeddings else LM_HEAD_NAME


def layer_tensor_names(config: ModelConfig, layer: int) -> list[str]:
    p = f"model.layers.{layer}."
    names = [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names += [p + f"self_attn.{x}_proj.weight" for x in ("q", "k", "v", "o")]
    names += [p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
    if attention_has_qkv_bias(config):
        names += [p + f"self_attn.{x}_proj.bias" for x in ("q", "k", "v")]
    if attention_has_output_bias(config):
        names.append(p + "self_attn.o_proj.bias")
    if config.qk_norm:
        names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
    if mlp_has_bias(config):
        names += [p + f"mlp.{x}_proj.bias" for x in ("gate", "up", "down")]
    return names


def checkpoint_tensor_names(config: ModelConfig, layer_range: LayerRange) -> list[str]:
    """Tensors a slice needs: its layers, plus the embedding and/or the norm and head."""
    names: list[str] = []
    if layer_range.is_first():
        names.append(EMBED_NAME)
    for layer in range(layer_range.start, layer_range.end):
        names += layer_tensor_names(config, layer)
    if layer_range.is_last(config.num_layers):
        names.append(FINAL_NORM_NAME)
        head = _head_source(config)
        if head not in names:
            names.append(head)
    return names


def _get(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise WeightLoadError(f"checkpoint lacks tensor {name!r}")
    return tensor


def _check_shape(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise WeightLoadError(
            f"tensor {what!r} has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
        )


def _copy(target: nn.Parameter, tensors: Mapping[str, torch.Tensor], name: str) -> None:
    source = _get(tensors, name)
    _check_shape(target, source, name)
    if (
        source.dtype == target.dtype
        and source.device == target.device
        and source.stride() == target.stride()
    ):
        # Adopt the tensor as is: a memory-mapped checkpoint then stays shared with the page
        # cache instead of being copied into fresh memory.
        target.data = source
    else:
        target.copy_(source)


def _copy_cat(
    target: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], names: list[str]
) -> None:
    """Fill a fused parameter from its parts, one copy (with dtype conversion) per part."""
    if target is None:
        return
    parts = [_get(tensors, name) for name in names]
    total = sum(part.shape[0] for part in parts)
    if total != target.shape[0] or any(p.shape[1:] != target.shape[1:] for p in parts):
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise WeightLoadError(
            f"tensors {' + '.join(names)} have shapes {shapes}, which do not fuse into "
            f"{tuple(target.shape)}"
        )
    offset = 0
    for part in parts:
        target.narrow(0, offset, part.shape[0]).copy_(part)
        offset += part.shape[0]


def _load_layer(layer: DecoderLayer, tensors: Mapping[str, torch.Tensor], prefix: str) -> None:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    _copy(layer.input_norm, tensors, prefix + "input_layernorm.weight")
    _copy(layer.post_norm, tensors, prefix + "post_attention_layernorm.weight")
    _copy_cat(layer.qkv_weight, tensors, [attn + f"{x}_proj.weight" for x in "qkv"])
    _copy_cat(layer.qkv_bias, tensors, [attn + f"{x}_proj.bias" for x in "qkv"])
    _copy(layer.o_weight, tensors, attn + "o_proj.weight")
    if layer.o_bias is not None:
        _copy(layer.o_bias, tensors, attn + "o_proj.bias")
    if layer.q_norm is not None and layer.k_norm is not None:
        _copy(layer.q_norm, tensors, attn + "q_norm.weight")
        _copy(layer.k_norm, tensors, attn + "k_norm.weight")
    _copy_cat(layer.gate_up_weight, tensors, [mlp + "gate_proj.weight", mlp + "up_proj.weight"])
    _copy_cat(layer.gate_up_bias, tensors, [mlp + "gate_proj.bias", mlp + "up_proj.bias"])
    _copy(layer.down_weight, tensors, mlp + "down_proj.weight")
    if layer.down_bias is not None:
        _copy(layer.down_bias, tensors, mlp + "down_proj.bias")
