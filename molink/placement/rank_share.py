"""The share of each checkpoint tensor that one rank of a tensor-parallel stage holds.

A rank of a stage split across ``size`` ranks holds its rows or columns of every matrix the
blocks split (q/k/v, o, gate/up, down, experts), a band of ``ceil(vocab / size)`` rows of
the embedding and LM head (each band padded to that length), one unit of a segment with
fewer units than ranks (the KV heads of a model with few of them), and whole copies of the
rest (norms, a router, the biases of row-split matrices). Which is which is not restated
here: the layers are built on the meta device with rank 0's linear factory and their own
shard rules read, as loading reads them (molink.models.loading), so the two cannot drift.
Every rank's share is the same size, so rank 0's stands for each.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from molink.config import ModelConfig
from molink.models.architecture import STACKING_ASSEMBLIES, Binding
from molink.models.loading import head_source, shard_rule_at
from molink.models.parallel.factory import ParallelLinearFactory
from molink.models.parallel.group import ParallelGroup
from molink.models.parallel.shard import ShardRule, vocab_rule
from molink.models.registry import architecture_for

_META = torch.device("meta")
Shape = tuple[int, ...]


def rank_shapes(config: ModelConfig, shapes: Mapping[str, Shape], size: int) -> dict[str, Shape]:
    """``shapes`` (checkpoint name -> logical shape) as one of ``size`` ranks holds them."""
    shares = dict(shapes)
    if size == 1:
        return shares
    arch = architecture_for(config)
    factory = ParallelLinearFactory(torch.float32, _META, ParallelGroup(0, size, _META))
    for index in range(config.num_layers):
        layer = arch.build_layer(config, index, factory)
        for binding in arch.layer_bindings(config, index):
            rule = shard_rule_at(layer, binding.target)
            if rule is not None:
                shares.update(_binding_share(binding, shapes, rule))
    band = vocab_rule(config.vocab_size, size, 0).local_size  # every band padded to this
    for name in {arch.embed_name, head_source(arch, config)}:
        if name in shapes:
            shares[name] = _with_length(shapes[name], 0, band)
    return shares


def _binding_share(
    binding: Binding, shapes: Mapping[str, Shape], rule: ShardRule
) -> dict[str, Shape]:
    """Each checkpoint part's rows (or columns) inside the rank's ranges, found as
    molink.models.parallel.reading finds them; an assembly that moves rows around is cut
    after it runs, so each of its parts counts the rank's fraction of the whole."""
    stacks = binding.assemble is None or binding.assemble in STACKING_ASSEMBLIES
    shares: dict[str, Shape] = {}
    offset = 0
    for name in binding.names:
        shape = shapes.get(name)
        if shape is None or rule.dim >= len(shape):
            continue
        length = shape[rule.dim]
        start = offset % rule.total if rule.dim == 0 else 0
        offset += length if rule.dim == 0 else 0
        if stacks and start + length <= rule.total:
            kept = sum(stop - begin for begin, stop in rule.pieces(start, length))
        else:
            kept = -(-length * rule.local_size // rule.total)
        shares[name] = _with_length(shape, rule.dim, kept)
    return shares


def _with_length(shape: Shape, dim: int, length: int) -> Shape:
    return (*shape[:dim], length, *shape[dim + 1 :])
