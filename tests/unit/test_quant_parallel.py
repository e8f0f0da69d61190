"""A tensor-parallel rank's share of a quantized GGUF: only its blocks are read, they are
exactly the single rank's rows and columns, and a split that would cut a group is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from molink.config import LayerRange
from molink.errors import InvalidParameterError
from molink.models.parallel.check import check_tensor_parallel
from molink.models.parallel.group import ParallelGroup
from molink.quant.gguf_blocks import BLOCK_TYPES, decode_blocks
from molink.quant.int4 import padded_rows
from molink.quant.linear import QuantLinear
from molink.quant.parallel import QuantColumnParallel, QuantRowParallel, QuantVocabTable
from molink.weights.gguf_slices import read_block_ranges
from molink.weights.gguf_source import GGUFSource
from molink.weights.hf_dir import hf_dir_source
from tests.helpers.tiny_quant_gguf import write_quantized_llama_gguf
from tests.unit.test_quant_gguf import make_blocks

pytest.importorskip("gguf")
LAYERS = LayerRange(0, 4)


@pytest.fixture
def quantized_gguf(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
    return write_quantized_llama_gguf(tiny_model_dir("llama"), tmp_path / "tiny-q8.gguf")


def dequantized(layer: QuantLinear) -> torch.Tensor:
    planes = layer.planes
    assert planes is not None, "the share must stay quantized"
    return planes.dequantize_rows(0, padded_rows(planes.rows))[: planes.rows]


def test_rank_holds_its_rows_and_columns_quantized(quantized_gguf) -> None:
    whole = GGUFSource(quantized_gguf).load_slice(LAYERS, "float32", quantization="gguf")
    source = GGUFSource(quantized_gguf)
    rank1 = source.load_slice(LAYERS, "float32", quantization="gguf", group=ParallelGroup(1, 2))
    log = {name: (dim, ranges) for name, dim, ranges in source.last_store.read_ranges_log}
    prefix = "model.layers.0."
    # q rows of heads 2-3 (64 wide), one KV head of two, the second half of o/down's inputs.
    assert log[prefix + "self_attn.q_proj.weight"] == (0, ((32, 64),))
    assert log[prefix + "self_attn.k_proj.weight"] == (0, ((16, 32),))
    assert log[prefix + "self_attn.o_proj.weight"] == (1, ((32, 64),))
    assert log[prefix + "mlp.down_proj.weight"] == (1, ((64, 128),))
    assert log["model.embed_tokens.weight"] == (0, ((192, 384),))
    attn, full_attn = rank1.layers[0].attn, whole.layers[0].attn
    assert isinstance(attn.qkv, QuantColumnParallel) and isinstance(attn.o, QuantRowParallel)
    assert attn.qkv.source_type == "Q8_0" and attn.o.source_type == "Q8_0"
    # The llama.cpp Q/K row permutation is undone on the rank's rows as on the whole.
    assert torch.equal(dequantized(attn.qkv)[:32], dequantized(full_attn.qkv)[32:64])
    assert torch.equal(dequantized(attn.o), dequantized(full_attn.o)[:, 32:64])
    mlp, full_mlp = rank1.layers[0].mlp, whole.layers[0].mlp
    assert torch.equal(dequantized(mlp.down), dequantized(full_mlp.down)[:, 64:])
    assert isinstance(rank1.embed, QuantVocabTable)
    assert torch.equal(dequantized(rank1.embed.local), dequantized(whole.embed)[192:])


def test_a_split_that_cuts_a_group_names_the_sizes(quantized_gguf) -> None:
    source = GGUFSource(quantized_gguf)
    # Four ranks: attention's output takes 16 inputs each, half a Q8_0 group of 32.
    with pytest.raises(InvalidParameterError, match=r"o_proj.*\[16, 32\).*Q8_0.*groups of 32"):
        source.load_slice(LAYERS, "float32", quantization="gguf", group=ParallelGroup(1, 4))


def test_methods_without_a_split_are_refused_by_name(quantized_gguf) -> None:
    config = GGUFSource(quantized_gguf).model_config
    check_tensor_parallel(config, 2, "gguf")
    check_tensor_parallel(config, 2, "int4")
    with pytest.raises(InvalidParameterError, match="awq weights are not split"):
        check_tensor_parallel(config, 2, "awq")


def test_on_the_fly_int4_shards_are_the_whole_matrix_cut(tiny_model_dir) -> None:
    """A float checkpoint quantized as it loads: each rank quantizes only its share, and
    groups fall where they fall on one rank, so the shares are the whole one's pieces."""
    source = hf_dir_source(tiny_model_dir("llama"))
    whole = source.load_slice(LAYERS, "float32", quantization="int4")
    ranks = [
        source.load_slice(LAYERS, "float32", quantization="int4", group=ParallelGroup(r, 2))
        for r in range(2)
    ]
    for path, dim in (("attn.o", 1), ("mlp.down", 1), ("mlp.gate_up", 0)):
        shares = [dequantized(_module(rank, path)) for rank in ranks]
        full = dequantized(_module(whole, path))
        if dim == 1:
            assert torch.equal(torch.cat(shares, dim=1), full)
        else:  # gate rows then up rows, each split
            half = full.shape[0] // 2
            gate, up = full[:half], full[half:]
            assert torch.equal(shares[0], torch.cat([gate[: half // 2], up[: half // 2]]))
            assert torch.equal(shares[1], torch.cat([gate[half // 2 :], up[half // 2 :]]))


def _module(model, path: str) -> QuantLinear:
    target = model.layers[0]
    for part in path.split("."):
        target = getattr(target, part)
    return target


@pytest.mark.parametrize("type_name", list(BLOCK_TYPES))
def test_block_ranges_equal_the_decoded_matrix_cut(type_name: str) -> None:
    """Rows, and columns on 32-weight boundaries inside a K type's 256-weight blocks."""
    rows, cols = 12, 512
    blocks = make_blocks(type_name, rows, cols)
    whole = decode_blocks(blocks, type_name, rows, cols).dequantize()
    order = np.arange(rows)[::-1].copy()  # a row permutation, as llama's Q/K have
    got = read_block_ranges(blocks, type_name, (rows, cols), order, 0, ((2, 5), (9, 12)), "w")
    assert torch.equal(got.dequantize(), whole.flip(0)[[2, 3, 4, 9, 10, 11]])
    got = read_block_ranges(blocks, type_name, (rows, cols), None, 1, ((32, 96), (288, 512)), "w")
    assert torch.equal(got.dequantize(), torch.cat([whole[:, 32:96], whole[:, 288:]], dim=1))
    with pytest.raises(InvalidParameterError, match=rf"\[16, 64\).*{type_name}.*groups of 32"):
        read_block_ranges(blocks, type_name, (rows, cols), None, 1, ((16, 64),), "w")
