"""Filling a DecoderSlice from Hugging Face-named checkpoint tensors.

Which tensors a slice needs (``checkpoint_tensor_names``) and how they land in it:
q/k/v and gate/up are fused into one matrix each; matrices are copied into the slice's
column-major storage (see ``matrix_param``) and, for small CPU models, also packed for
oneDNN straight from the row-major checkpoint tensor.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from molink.config import LayerRange, ModelConfig
from molink.errors import WeightLoadError
from molink.models.cpu_linear import prepack
from molink.models.layers import (
    DecoderLayer,
    attention_has_output_bias,
    attention_has_qkv_bias,
    mlp_has_bias,
)

if TYPE_CHECKING:
    from molink.models.decoder import DecoderSlice

EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"
_ROW_BLOCK = 64  # rows per step of a transposing copy: keeps both sides in cache


def head_source(config: ModelConfig) -> str:
    """With tied embeddings the LM head is the embedding matrix."""
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
        head = head_source(config)
        if head not in names:
            names.append(head)
    return names


def load_slice_tensors(
    model: DecoderSlice, tensors: Mapping[str, torch.Tensor], *, pack: bool
) -> None:
    with torch.no_grad():
        if model.embed is not None:
            _set_matrix(model.embed, _get(tensors, EMBED_NAME), EMBED_NAME)
        # A progress bar on a terminal; silent when the output is a log file or a pipe.
        layers = tqdm(model.layers, desc="Loading layers", unit="layer", disable=None)
        for index, layer in enumerate(layers):
            prefix = f"model.layers.{model.layer_range.start + index}."
            _load_layer(layer, tensors, prefix, pack)
        if model.final_norm is not None:
            _set_vector(model.final_norm, tensors, FINAL_NORM_NAME)
        model.lm_head_packed = None
        if model.lm_head is not None:
            name = head_source(model.config)
            head = _get(tensors, name)
            if model.lm_head is not model.embed:
                _set_matrix(model.lm_head, head, name)
            if pack:
                model.lm_head_packed = prepack(head.to(model.lm_head.dtype))


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


def _set_vector(target: torch.nn.Parameter, tensors: Mapping[str, torch.Tensor], name: str) -> None:
    source = _get(tensors, name)
    _check_shape(target, source, name)
    if source.dtype == target.dtype and source.device == target.device:
        # Adopt the tensor as is: a memory-mapped checkpoint stays shared with the page cache.
        target.data = source
    else:
        target.copy_(source)


def _set_matrix(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    """Copy a row-major [out, in] tensor into ``target``, whatever its layout."""
    _check_shape(target, source, what)
    source = source.to(device=target.device, dtype=target.dtype)
    if target.device.type != "cpu" or target.stride() == source.stride():
        target.copy_(source)
        return
    # A plain copy_ into a transposed view walks memory with a large stride on one side;
    # copying a band of rows at a time is several times faster.
    for row in range(0, source.shape[0], _ROW_BLOCK):
        target[row : row + _ROW_BLOCK].copy_(source[row : row + _ROW_BLOCK])


def _fused(
    tensors: Mapping[str, torch.Tensor], names: list[str], target: torch.Tensor
) -> torch.Tensor:
    """The parts stacked along output rows (row-major), checked against ``target``."""
    parts = [_get(tensors, name) for name in names]
    total = sum(part.shape[0] for part in parts)
    if total != target.shape[0] or any(p.shape[1:] != target.shape[1:] for p in parts):
        shapes = ", ".join(str(tuple(p.shape)) for p in parts)
        raise WeightLoadError(
            f"tensors {' + '.join(names)} have shapes {shapes}, which do not fuse into "
            f"{tuple(target.shape)}"
        )
    return torch.cat([p.to(target.dtype) for p in parts], dim=0)


def _set_fused_bias(
    target: torch.Tensor | None, tensors: Mapping[str, torch.Tensor], names: list[str]
) -> None:
    if target is not None:
        target.copy_(_fused(tensors, names, target))


def _load_matrix(
    layer: DecoderLayer, attr: str, source: torch.Tensor, what: str, pack: bool
) -> None:
    weight = getattr(layer, f"{attr}_weight")
    _set_matrix(weight, source, what)
    setattr(layer, f"{attr}_packed", prepack(source.to(weight.dtype)) if pack else None)


def _load_layer(
    layer: DecoderLayer, tensors: Mapping[str, torch.Tensor], prefix: str, pack: bool
) -> None:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    _set_vector(layer.input_norm, tensors, prefix + "input_layernorm.weight")
    _set_vector(layer.post_norm, tensors, prefix + "post_attention_layernorm.weight")
    qkv_names = [attn + f"{x}_proj.weight" for x in "qkv"]
    qkv = _fused(tensors, qkv_names, layer.qkv_weight)
    _load_matrix(layer, "qkv", qkv, " + ".join(qkv_names), pack)
    _set_fused_bias(layer.qkv_bias, tensors, [attn + f"{x}_proj.bias" for x in "qkv"])
    o_name = attn + "o_proj.weight"
    _load_matrix(layer, "o", _get(tensors, o_name), o_name, pack)
    if layer.o_bias is not None:
        _set_vector(layer.o_bias, tensors, attn + "o_proj.bias")
    if layer.q_norm is not None and layer.k_norm is not None:
        _set_vector(layer.q_norm, tensors, attn + "q_norm.weight")
        _set_vector(layer.k_norm, tensors, attn + "k_norm.weight")
    gate_up_names = [mlp + "gate_proj.weight", mlp + "up_proj.weight"]
    gate_up = _fused(tensors, gate_up_names, layer.gate_up_weight)
    _load_matrix(layer, "gate_up", gate_up, " + ".join(gate_up_names), pack)
    _set_fused_bias(layer.gate_up_bias, tensors, [mlp + "gate_proj.bias", mlp + "up_proj.bias"])
    down_name = mlp + "down_proj.weight"
    _load_matrix(layer, "down", _get(tensors, down_name), down_name, pack)
    if layer.down_bias is not None:
        _set_vector(layer.down_bias, tensors, mlp + "down_proj.bias")
