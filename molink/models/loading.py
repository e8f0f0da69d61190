"""Filling a DecoderSlice from Hugging Face-named checkpoint tensors, through Bindings.

Which tensors a slice needs (``checkpoint_tensor_names``) and where they land are both
read from the architecture's bindings, so the two can never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from molink.config import LayerRange, ModelConfig
from molink.errors import WeightLoadError
from molink.models.architecture import STACKING_ASSEMBLIES, Binding, DecoderArchitecture
from molink.models.blocks.linear import GroupedLinearLike, LinearLike, TableLike, copy_matrix
from molink.models.cpu_linear import prepack
from molink.models.parallel.reading import narrow_ranges, read_shards
from molink.models.parallel.shard import Sharded, ShardRule
from molink.models.registry import architecture_for
from molink.progress import track
from molink.quant.groups import GroupInts
from molink.quant.groups import cat_rows as group_cat_rows

if TYPE_CHECKING:
    from molink.models.decoder import DecoderSlice


def head_source(arch: DecoderArchitecture, config: ModelConfig) -> str:
    """With tied embeddings the LM head is the embedding matrix."""
    return arch.embed_name if config.tie_word_embeddings else arch.lm_head_name


def checkpoint_tensor_names(config: ModelConfig, layer_range: LayerRange) -> list[str]:
    """Tensors a slice needs: its layers, plus the embedding and/or the norm and head."""
    arch = architecture_for(config)
    names: list[str] = []
    if layer_range.is_first():
        names.append(arch.embed_name)
    for index in range(layer_range.start, layer_range.end):
        for binding in arch.layer_bindings(config, index):
            names += binding.names
    if layer_range.is_last(config.num_layers):
        for binding in arch.final_norm_bindings(config):
            names += binding.names
        names.append(head_source(arch, config))
    # One tensor may fill two targets (MLA's kv_b_proj) or serve both ends (tied head).
    return list(dict.fromkeys(names))


def load_slice_tensors(
    model: DecoderSlice, tensors: Mapping[str, torch.Tensor], *, pack: bool
) -> None:
    arch, config = model.architecture, model.config
    with torch.no_grad():
        if model.embed is not None:
            embed = _read_table(model.embed, tensors, arch.embed_name)
            _load_table(model.embed, embed, arch.embed_name, pack)
        # A progress bar on a terminal; silent when the output is a log file or a pipe.
        layers = track(model.layers, "loading layers", unit="layer")
        for offset, layer in enumerate(layers):
            index = model.layer_range.start + offset
            bind(layer, arch.layer_bindings(config, index), tensors, pack)
        if model.final_norm is not None:
            bind(model.final_norm, arch.final_norm_bindings(config), tensors, pack)
        model.lm_head_packed = None
        if model.lm_head is not None:
            name = head_source(arch, config)
            head = _read_table(model.lm_head, tensors, name)
            if model.lm_head is not model.embed:
                _load_table(model.lm_head, head, name, pack)
            if pack and isinstance(model.lm_head, torch.Tensor):
                model.lm_head_packed = prepack(head.to(model.lm_head.dtype))


def bind(
    module: nn.Module, bindings: list[Binding], tensors: Mapping[str, torch.Tensor], pack: bool
) -> None:
    for binding in bindings:
        rule = shard_rule_at(module, binding.target)
        # An assembly that moves rows around (GPT-OSS's interleaved experts) is cut after
        # it runs, from the whole tensors; plain or stacked parts are read in part.
        cut_after = rule is not None and not _keeps_rows(binding)
        parts = _read_parts(binding, tensors, None if cut_after else rule)
        what = " + ".join(binding.names)
        try:
            if binding.assemble is not None:
                value = binding.assemble(parts)
            elif len(parts) == 1:
                value = parts[0]
            else:
                value = cat_rows(parts)
        except RuntimeError as exc:
            raise WeightLoadError(f"tensors {what} do not combine: {exc}") from exc
        target = _resolve(module, binding.target)
        if cut_after:
            assert rule is not None
            value = _cut_assembled(value, rule, isinstance(target, nn.Parameter), what)
        if isinstance(target, nn.Parameter):
            _set_param(target, value, what)
        elif isinstance(target, (LinearLike, GroupedLinearLike)):
            try:
                target.load_weight(value, pack)
            except WeightLoadError as exc:
                raise WeightLoadError(f"{what}: {exc}") from exc
        else:
            raise TypeError(f"binding target {binding.target!r} is {type(target).__name__}")
    check_all_bound(module, bindings)


def check_all_bound(module: nn.Module, bindings: list[Binding]) -> None:
    """Every parameter is filled by a binding: one left out would keep whatever its
    allocation held (a config asking for a bias the architecture binds no tensor to).
    A binding of a linear layer fills its weights, not its bias (a binding of its own)."""
    targets = [binding.target for binding in bindings]
    for name, _ in module.named_parameters():
        if name in targets or any(
            name.startswith(target + ".") and name != target + ".bias" for target in targets
        ):
            continue
        raise WeightLoadError(f"no checkpoint tensor fills {name}; bound: {', '.join(targets)}")


def shard_rule_at(module: nn.Module, path: str) -> ShardRule | None:
    """How the tensor at ``path`` is cut across tensor-parallel ranks; None: whole."""
    target = _resolve(module, path)
    if isinstance(target, Sharded) and not isinstance(target, torch.Tensor):
        return target.shard_rule("weight")
    parent_path, _, attr = path.rpartition(".")
    parent = _resolve(module, parent_path) if parent_path else module
    return parent.shard_rule(attr) if isinstance(parent, Sharded) else None


def _keeps_rows(binding: Binding) -> bool:
    return binding.assemble is None or binding.assemble in STACKING_ASSEMBLIES


def _read_parts(
    binding: Binding, tensors: Mapping[str, torch.Tensor], rule: ShardRule | None
) -> list[torch.Tensor]:
    """The binding's checkpoint tensors, or this rank's rows/columns of each."""
    if rule is None:
        return [_get(tensors, name) for name in binding.names]
    return read_shards(tensors, binding.names, rule)


def _cut_assembled(
    value: torch.Tensor, rule: ShardRule, is_vector: bool, what: str
) -> torch.Tensor:
    """This rank's share of an assembled tensor: the rule cuts each matrix (or vector) of
    it, which may be stacked per expert in front."""
    dim = rule.dim + value.dim() - (1 if is_vector else 2)
    if not 0 <= dim < value.dim() or value.shape[dim] != rule.total:
        raise WeightLoadError(
            f"{what}: shape {tuple(value.shape)} does not hold the {rule.total} rows or "
            "columns split across ranks"
        )
    return narrow_ranges(value, dim, rule.pieces(0, rule.total))


def _read_table(
    target: nn.Parameter | TableLike, tensors: Mapping[str, torch.Tensor], name: str
) -> torch.Tensor:
    rule = target.shard_rule("weight") if isinstance(target, Sharded) else None
    if rule is None:
        return _get(tensors, name)
    (part,) = read_shards(tensors, (name,), rule)
    return part


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Checkpoint matrices stacked along output rows (fused q/k/v, gate/up); quantized
    parts (``GroupInts``) stack as integers and scales, without a float copy."""
    quantized = [isinstance(part, GroupInts) for part in parts]
    if all(quantized):
        return group_cat_rows(parts)  # type: ignore[arg-type,return-value]
    if any(quantized):
        # A file mixing float and quantized parts of one fused matrix: that matrix is float.
        parts = [p.dequantize() if isinstance(p, GroupInts) else p.float() for p in parts]
    return torch.cat(parts, dim=0)


def _load_table(
    target: nn.Parameter | TableLike, source: torch.Tensor, what: str, pack: bool
) -> None:
    if isinstance(target, TableLike):
        try:
            target.load_weight(source, pack)
        except WeightLoadError as exc:
            raise WeightLoadError(f"{what}: {exc}") from exc
    else:
        copy_matrix(target, source, what)


def _resolve(module: nn.Module, path: str) -> object:
    target: object = module
    for part in path.split("."):
        target = getattr(target, part)
    return target


def _get(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    tensor = tensors.get(name)
    if tensor is None:
        raise WeightLoadError(f"checkpoint lacks tensor {name!r}")
    return tensor


def _set_param(target: nn.Parameter, source: torch.Tensor, what: str) -> None:
    if tuple(source.shape) != tuple(target.shape):
        raise WeightLoadError(
            f"tensor {what!r} has shape {tuple(source.shape)}, expected {tuple(target.shape)}"
        )
    if source.dtype == target.dtype and source.device == target.device:
        # Adopt the tensor as is: a memory-mapped checkpoint stays shared with the page cache.
        target.data = source
    else:
        target.copy_(source)
