"""Dynamic NTK and longrope past the pre-training context, against transformers' generate
path: the prompt in one forward, then one token per forward through its KV cache."""

from __future__ import annotations

import pytest
import torch

from molink.models import SeqChunk
from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner, load_pipeline
from tests.helpers.tiny_models import load_reference_model

TOLERANCE = 1e-4
BLOCK_SIZE = 4
DYNAMIC = {"rope_type": "dynamic", "factor": 2.0}


def _tokens(length: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=torch.Generator().manual_seed(7)).tolist()


def _transformers_logits(model, tokens: list[int], prompt_len: int) -> torch.Tensor:
    """Logits after the prompt and after each later token, fed one at a time with the cache."""
    with torch.no_grad():
        out = model(torch.tensor([tokens[:prompt_len]]), use_cache=True)
        rows, cache = [out.logits[0, -1]], out.past_key_values
        for position in range(prompt_len, len(tokens)):
            out = model(
                torch.tensor([[tokens[position]]]),
                cache=cache,
                use_cache=True,
                position_ids=torch.tensor([[position]]),
            )
            rows.append(out.logits[0, -1])
            cache = out.past_key_values
    return torch.stack(rows)


def _our_logits(slices, tokens: list[int], prompt_len: int) -> torch.Tensor:
    blocks = list(range(len(tokens) // BLOCK_SIZE + 1))
    runner = PagedRunner(slices, len(blocks), BLOCK_SIZE)
    hidden = runner.forward([SeqChunk(0, prompt_len, blocks)], tokens[:prompt_len])
    rows = [slices[-1].compute_logits(hidden)[-1]]
    for position in range(prompt_len, len(tokens)):
        hidden = runner.forward([SeqChunk(position, 1, blocks)], [tokens[position]])
        rows.append(slices[-1].compute_logits(hidden)[-1])
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("arch", "overrides", "prompt_len", "total"),
    [
        # longrope: original context 64 of 256; a prompt past it, then one crossing it
        ("phi3", {}, 80, 90),
        ("phi3", {}, 58, 72),
        # dynamic NTK: context 64 extended to 128 by factor 2
        ("llama", {"max_position_embeddings": 64, "rope_scaling": DYNAMIC}, 80, 90),
        ("llama", {"max_position_embeddings": 64, "rope_scaling": DYNAMIC}, 58, 72),
    ],
)
def test_long_context_rope_matches_transformers_generate(
    tiny_model_dir, arch: str, overrides: dict, prompt_len: int, total: int
) -> None:
    path = tiny_model_dir(arch, **overrides)
    source = resolve_model_source(str(path))
    tokens = _tokens(total, source.model_config.vocab_size)
    expected = _transformers_logits(load_reference_model(path), tokens, prompt_len)
    for stages in (1, 2):
        ours = _our_logits(load_pipeline(source, stages), tokens, prompt_len)
        diff = (ours - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{arch} {prompt_len}->{total}, {stages} slices: {diff}"


def test_dynamic_ntk_serves_up_to_its_extended_context(tiny_model_dir) -> None:
    from molink.engine.factory import resolve_max_model_len

    path = tiny_model_dir("llama", max_position_embeddings=64, rope_scaling=DYNAMIC)
    config = resolve_model_source(str(path)).model_config
    assert resolve_max_model_len(config, None) == 128
    plain = resolve_model_source(str(tiny_model_dir("llama"))).model_config
    assert resolve_max_model_len(plain, None) == plain.max_position_embeddings
