"""Attention metadata, the paged KV cache, the registry and the decoder's input checks."""

from __future__ import annotations

import pytest
import torch

from molink.config import LayerRange, ModelConfig
from molink.errors import InvalidParameterError, UnsupportedArchitectureError
from molink.models import (
    SUPPORTED_ARCHITECTURES,
    AttentionMetadata,
    KVCache,
    SeqChunk,
    build_model,
    resolve_architecture,
)
from molink.models.attention import paged_attention
from molink.models.registry import architecture_for


def _config(**overrides) -> ModelConfig:
    fields = dict(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=128,
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def test_positions_and_slots_follow_chunk_order() -> None:
    meta = AttentionMetadata.build(
        [SeqChunk(5, 1, [7, 2]), SeqChunk(0, 3, [4]), SeqChunk(2, 2, [9, 1])], block_size=4
    )
    assert meta.positions.tolist() == [5, 0, 1, 2, 2, 3]
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 16, 17, 18, 9 * 4 + 2, 9 * 4 + 3]
    assert meta.decode is not None and meta.decode.batch_size == 1
    assert [p.rows for p in meta.prefills] == [slice(1, 4), slice(4, 6)]
    assert meta.prefills[0].block_table is None  # from position 0: own keys only
    assert meta.prefills[1].mask.tolist() == [[True, True, True, False], [True, True, True, True]]


def test_consecutive_slots_are_planned_as_one_run() -> None:
    assert AttentionMetadata.build([SeqChunk(5, 1, [7, 2])], block_size=4).slot_run == (9, 1)
    prompt = AttentionMetadata.build([SeqChunk(2, 5, [3, 4])], block_size=4)
    assert prompt.slot_run == (14, 5)  # blocks 3 and 4 hold slots 12..19
    assert AttentionMetadata.build([SeqChunk(2, 5, [4, 3])], block_size=4).slot_run is None
    two = [SeqChunk(5, 1, [7, 2]), SeqChunk(6, 1, [7, 2])]  # slots 9, 10: still one run
    assert AttentionMetadata.build(two, block_size=4).slot_run == (9, 2)
    apart = [SeqChunk(5, 1, [7, 2]), SeqChunk(3, 1, [1])]
    assert AttentionMetadata.build(apart, block_size=4).slot_run is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_a_run_of_slots_is_written_as_an_index_writes_it(dtype: torch.dtype) -> None:
    from molink.models.attention import store_kv

    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(5, 2, 8, generator=gen), torch.randn(5, 2, 8, generator=gen)
    run = AttentionMetadata.build([SeqChunk(2, 5, [3, 4])], block_size=4)
    assert run.slot_run is not None
    by_index = AttentionMetadata(
        run.chunks, 4, run.positions, run.slot_mapping, run.decode, run.prefills, None
    )
    caches = [torch.zeros(6, 4, 2, 8, dtype=dtype) for _ in range(4)]
    store_kv(k, v, caches[0], caches[1], run)
    store_kv(k, v, caches[2], caches[3], by_index)
    assert caches[0].view(torch.uint8).equal(caches[2].view(torch.uint8))
    assert caches[1].view(torch.uint8).equal(caches[3].view(torch.uint8))
    assert caches[0].view(-1, 2, 8)[14:19].float().abs().sum() > 0


def test_decode_group_pads_and_masks_shorter_sequences() -> None:
    meta = AttentionMetadata.build(
        [SeqChunk(5, 1, [3, 8, 6]), SeqChunk(0, 2, [1]), SeqChunk(1, 1, [0])], block_size=4
    )
    decode = meta.decode
    assert decode.rows.tolist() == [0, 3]  # not contiguous: an index tensor
    assert decode.block_table.tolist() == [3, 8, 0, 0]
    assert decode.context_len == 6
    assert decode.mask.view(2, -1).tolist() == [[True] * 6, [True, True] + [False] * 4]


def test_equal_length_decodes_need_no_mask() -> None:
    meta = AttentionMetadata.build([SeqChunk(3, 1, [0]), SeqChunk(3, 1, [1])], block_size=4)
    assert meta.decode.mask is None and meta.decode.rows == slice(0, 2)


def test_sliding_window_masks() -> None:
    meta = AttentionMetadata.build(
        [SeqChunk(5, 1, [0, 1]), SeqChunk(0, 4, [2])], block_size=4, sliding_window=3
    )
    assert meta.decode.mask.view(-1).tolist() == [False, False, False, True, True, True]
    assert meta.prefills[0].mask.tolist() == [
        [True, False, False, False],
        [True, True, False, False],
        [True, True, True, False],
        [False, True, True, True],
    ]


@pytest.mark.parametrize(
    ("chunk", "field"),
    [
        (SeqChunk(0, 0, [0]), "chunks"),
        (SeqChunk(-1, 1, [0]), "chunks"),
        (SeqChunk(3, 2, [0]), "block_ids"),
    ],
)
def test_bad_chunks_are_rejected(chunk: SeqChunk, field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        AttentionMetadata.build([chunk], block_size=4)
    assert info.value.field == field


def test_empty_batch_is_rejected() -> None:
    with pytest.raises(InvalidParameterError):
        AttentionMetadata.build([], block_size=4)


def test_paged_attention_matches_dense_causal_attention() -> None:
    """Prefill in two chunks then decode equals one dense causal pass over the sequence."""
    torch.manual_seed(0)
    heads, kv_heads, dim, length = 4, 2, 8, 7
    q = torch.randn(length, heads, dim)
    k = torch.randn(length, kv_heads, dim)
    v = torch.randn(length, kv_heads, dim)
    cache = KVCache.allocate(_config(), 1, num_blocks=8, block_size=2, dtype=torch.float32)
    blocks = [5, 1, 6, 3]
    outs = []
    for start, n in [(0, 3), (3, 3), (6, 1)]:
        meta = AttentionMetadata.build([SeqChunk(start, n, blocks)], block_size=2)
        rows = slice(start, start + n)
        outs.append(
            paged_attention(q[rows], k[rows], v[rows], cache.keys[0], cache.values[0], meta)
        )
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1),
        k.repeat_interleave(2, 1).transpose(0, 1),
        v.repeat_interleave(2, 1).transpose(0, 1),
        is_causal=True,
    )
    assert torch.allclose(torch.cat(outs), dense.transpose(0, 1).reshape(length, -1), atol=1e-6)


def test_kv_cache_shapes_and_size() -> None:
    config = _config()
    cache = KVCache.allocate(config, 2, num_blocks=5, block_size=4, dtype=torch.bfloat16)
    assert cache.num_layers == 2 and cache.num_blocks == 5
    assert cache.keys[1].shape == (5, 4, 2, 8)
    expected = 2 * 2 * 4 * 2 * 8 * 2  # layers * (k, v) * block * heads * dim * bytes
    assert KVCache.bytes_per_block(config, 2, 4, torch.bfloat16) == expected
    assert cache.storage.numel() * 2 == expected * 5
    with pytest.raises(InvalidParameterError):
        KVCache.allocate(config, 2, num_blocks=0, block_size=4, dtype=torch.float32)


def test_registry() -> None:
    assert resolve_architecture(["Foo", "Qwen3ForCausalLM"]) == "Qwen3ForCausalLM"
    for name in SUPPORTED_ARCHITECTURES:  # every line of the registry names a real file
        assert architecture_for(_config(architecture=name)).layer_bindings
    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve_architecture(["GPT2LMHeadModel"])
    assert info.value.supported == list(SUPPORTED_ARCHITECTURES)
    assert "GPT2LMHeadModel" in str(info.value) and "Gemma3ForCausalLM" in str(info.value)
    with pytest.raises(UnsupportedArchitectureError):
        resolve_architecture(None)


def test_slice_input_checks() -> None:
    config = _config()
    middle = build_model(config, LayerRange(1, 2), torch.float32)
    assert not middle.is_first and not middle.is_last and middle.embed is None
    with pytest.raises(InvalidParameterError, match="LM head"):
        middle.compute_logits(torch.zeros(1, 32))
    meta = AttentionMetadata.build([SeqChunk(0, 1, [0])], block_size=4)
    wrong_cache = KVCache.allocate(config, 2, 4, 4, torch.float32)
    with pytest.raises(InvalidParameterError, match="kv_cache"):
        middle(torch.zeros(1, 32), meta, wrong_cache)
    with pytest.raises(InvalidParameterError, match="layer_range"):
        build_model(config, LayerRange(2, 4), torch.float32)
    with pytest.raises(InvalidParameterError, match="rope"):
        build_model(
            _config(rope_scaling={"rope_type": "mrope", "factor": 2.0}),
            LayerRange(0, 1),
            torch.float32,
        )


def test_positions_beyond_the_rotary_table_are_refused() -> None:
    from molink.errors import ContextLengthExceededError

    config = _config(max_position_embeddings=8)
    model = build_model(config, LayerRange(1, 2), torch.float32)
    cache = KVCache.allocate(config, 1, 4, 4, torch.float32)
    meta = AttentionMetadata.build([SeqChunk(8, 1, [0, 1, 2])], block_size=4)
    with pytest.raises(ContextLengthExceededError):
        model(torch.zeros(1, 32), meta, cache)
    with pytest.raises(InvalidParameterError, match="kv_cache"):
        model(torch.zeros(1, 32), meta, KVCache.allocate(config, 1, 4, 4, torch.float16))


def test_unsupported_config_fields_are_refused_by_name() -> None:
    quantized = _config(raw={"quantization_config": {"quant_method": "bitsandbytes"}})
    with pytest.raises(InvalidParameterError, match="quantization_config.*bitsandbytes"):
        build_model(quantized, LayerRange(0, 1), torch.float32)
    with pytest.raises(InvalidParameterError, match="hidden_act"):
        build_model(_config(raw={"hidden_act": "relu2"}), LayerRange(0, 1), torch.float32)
