"""q and k rotated in one pass (molink.models.forward_context.ForwardContext.rotate_qk) give
bit for bit what rotating them apart gives, and attention over the views it returns is
bit for bit attention over separate q and k tensors."""

from __future__ import annotations

import pytest
import torch

from molink.models.attention import paged_attention
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.blocks.attention import AttentionSpec, SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.forward_context import ForwardContext
from molink.models.rope import RopeSpec, RotaryTables

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4
SPECS = {
    "default": RopeSpec(10000.0, HEAD_DIM, 64),
    "partial": RopeSpec(10000.0, HEAD_DIM, 64, rotary_dim=HEAD_DIM // 2),
    "interleaved": RopeSpec(10000.0, HEAD_DIM, 64, interleaved=True),
    # Sequences past 16 tokens take the long factors: angles depend on each one's length.
    "longrope": RopeSpec(
        10000.0,
        HEAD_DIM,
        64,
        scaling={
            "rope_type": "longrope",
            "short_factor": [1.0 + i / 10 for i in range(HEAD_DIM // 2)],
            "long_factor": [2.0 + i / 5 for i in range(HEAD_DIM // 2)],
        },
        original_max_positions=16,
    ),
}
# A prefill from 0, a prefill after cached tokens, and decodes of short and long sequences.
CHUNKS = [
    SeqChunk(0, 5, [0, 1]),
    SeqChunk(4, 3, [2, 3]),
    SeqChunk(9, 1, [4, 5, 6]),
    SeqChunk(20, 1, [7, 8, 9, 10, 11, 12]),
    SeqChunk(2, 1, [13]),
]


def _batches() -> list[list[SeqChunk]]:
    decodes = [c for c in CHUNKS if c.num_tokens == 1]
    return [decodes[:1], decodes, CHUNKS]


@pytest.mark.parametrize("variant", list(SPECS))
@pytest.mark.parametrize("chunks", _batches(), ids=["one_decode", "decodes", "mixed"])
def test_rotating_q_and_k_together_equals_apart(variant: str, chunks: list[SeqChunk]) -> None:
    tables = RotaryTables(SPECS[variant], torch.float32, torch.device("cpu"))
    meta = AttentionMetadata.build(chunks, BLOCK)
    tokens = meta.num_tokens
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    qkv = torch.randn(tokens, width, generator=torch.Generator().manual_seed(tokens))
    q_size, kv_size = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    apart = ForwardContext(meta, {"default": tables})
    q = apart.rotate("default", qkv[:, :q_size].view(tokens, HEADS, HEAD_DIM))
    k = apart.rotate("default", qkv[:, q_size : q_size + kv_size].view(tokens, KV_HEADS, -1))
    together = ForwardContext(meta, {"default": tables})
    qk = qkv[:, : q_size + kv_size].view(tokens, HEADS + KV_HEADS, HEAD_DIM)
    q2, k2 = together.rotate_qk("default", qk, HEADS)
    assert torch.equal(q, q2) and torch.equal(k, k2)


@pytest.mark.parametrize("chunks", _batches(), ids=["one_decode", "decodes", "mixed"])
def test_attention_over_the_rotated_views_is_unchanged(chunks: list[SeqChunk]) -> None:
    """SelfAttention (no q/k norm) rotates q and k together; attending over the views of
    that one tensor gives what separate contiguous q and k gave, output and cache."""
    spec = AttentionSpec(HEADS * HEAD_DIM, HEADS, KV_HEADS, HEAD_DIM)
    attn = SelfAttention(spec, LinearFactory(torch.float32, torch.device("cpu")))
    gen = torch.Generator().manual_seed(5)
    width = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    attn.qkv.load_weight(torch.randn(width, HEADS * HEAD_DIM, generator=gen) * 0.2, pack=False)
    meta = AttentionMetadata.build(chunks, BLOCK)
    h = torch.randn(meta.num_tokens, HEADS * HEAD_DIM, generator=gen)
    tables = {"default": RotaryTables(SPECS["default"], torch.float32, torch.device("cpu"))}
    shape = (16, BLOCK, KV_HEADS, HEAD_DIM)
    keys, values = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    new_keys, new_values = keys.clone(), values.clone()
    got = attn(h, ForwardContext(meta, tables), new_keys, new_values)

    ctx = ForwardContext(meta, tables)
    qkv = attn.qkv(h)
    q = ctx.rotate("default", qkv[:, : spec.q_size].contiguous().view(-1, HEADS, HEAD_DIM))
    k = qkv[:, spec.q_size : spec.q_size + spec.kv_size].contiguous().view(-1, KV_HEADS, HEAD_DIM)
    k = ctx.rotate("default", k)
    v = qkv[:, spec.q_size + spec.kv_size :].view(-1, KV_HEADS, HEAD_DIM)
    expected = paged_attention(q, k, v, keys, values, meta)
    assert torch.equal(got, expected)
    assert torch.equal(new_keys, keys) and torch.equal(new_values, values)
