"""Our decoders against transformers' (float32) through the paged cache, in 1, 2 and 3 slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner, Seq, load_pipeline
from tests.helpers.tiny_models import TINY_ARCHS, load_reference_model

BLOCK_SIZE = 4
NUM_BLOCKS = 64
NEW_TOKENS = 16
TOLERANCE = 1e-4


def _prompt(generator: torch.Generator, length: int, vocab: int) -> list[int]:
    return torch.randint(3, vocab, (length,), generator=generator).tolist()


def _run_schedule(runner: PagedRunner, vocab: int) -> list[Seq]:
    """Mixed prefill/decode steps over four sequences of different lengths.

    Block tables are non-contiguous; C reuses A's first two blocks (a prefix-cache hit, so its
    first forward starts at position 8); B is prefilled in three chunks.
    """
    g = torch.Generator().manual_seed(1234)
    a = Seq(_prompt(g, 11, vocab), [9, 3, 14, 30, 22, 41, 17, 50])
    b = Seq(_prompt(g, 13, vocab), [5, 60, 1, 33, 12, 8, 27, 44])
    c = Seq(a.tokens[:8] + _prompt(g, 5, vocab), [9, 3, 19, 2, 55, 36, 29, 47])
    c.num_computed = 8  # its first 8 tokens are A's, already cached in blocks 9 and 3
    d = Seq(_prompt(g, 3, vocab), [61, 7, 38, 25, 11, 58])
    runner.step([(a, 11), (b, 5), (d, 3)])
    runner.step([(d, 1), (c, 5), (a, 1), (b, 5)])  # decode rows 0 and 6: not contiguous
    runner.step([(b, 3), (a, 1), (c, 1), (d, 1)])
    runner.decode([a, b, c, d], NEW_TOKENS, order=[3, 1, 0, 2])
    return [a, b, c, d]


def _reference_logits(model: torch.nn.Module, seq: Seq) -> torch.Tensor:
    """transformers' logits at the positions where we sampled, one forward without cache."""
    num_sampled = len(seq.logits)
    tokens = torch.tensor([seq.tokens[:-1]])
    with torch.no_grad():
        logits = model(tokens).logits[0]
    return logits[-num_sampled:]


def _run(path: Path, num_stages: int) -> list[Seq]:
    source = resolve_model_source(str(path))
    slices = load_pipeline(source, num_stages)
    return _run_schedule(
        PagedRunner(slices, NUM_BLOCKS, BLOCK_SIZE), source.model_config.vocab_size
    )


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_logits_match_transformers_in_one_two_and_three_slices(tiny_model_dir, arch: str) -> None:
    path = tiny_model_dir(arch)
    reference = load_reference_model(path)
    single = _run(path, 1)
    for seq in single:
        ours = torch.stack(seq.logits)
        assert ours.shape[0] == NEW_TOKENS
        diff = (ours - _reference_logits(reference, seq)).abs().max().item()
        assert diff <= TOLERANCE, f"{arch}: max |diff| {diff}"
    for num_stages in (2, 3):
        split = _run(path, num_stages)
        for whole, parts in zip(single, split, strict=True):
            assert parts.tokens == whole.tokens
            diff = (torch.stack(parts.logits) - torch.stack(whole.logits)).abs().max().item()
            assert diff <= TOLERANCE, f"{arch} in {num_stages} slices: max |diff| {diff}"


def test_mistral_sliding_window_matches_transformers(tiny_model_dir) -> None:
    path = tiny_model_dir("mistral", sliding_window=6)
    reference = load_reference_model(path)
    assert reference.config.sliding_window == 6
    for seq in _run(path, 2):
        diff = (torch.stack(seq.logits) - _reference_logits(reference, seq)).abs().max().item()
        assert diff <= TOLERANCE


def test_yarn_rope_matches_transformers(tiny_model_dir) -> None:
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    path = tiny_model_dir("qwen2", rope_scaling=scaling)
    reference = load_reference_model(path)
    for seq in _run(path, 1):
        diff = (torch.stack(seq.logits) - _reference_logits(reference, seq)).abs().max().item()
        assert diff <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_bfloat16_stays_close_to_float32(tiny_model_dir, arch: str) -> None:
    """bfloat16 runs the same paths (no oneDNN packing); its rounding is the only difference.

    Only the first logits of each sequence are compared: later tokens may differ.
    """
    source = resolve_model_source(str(tiny_model_dir(arch)))
    vocab = source.model_config.vocab_size
    full = _run_schedule(PagedRunner(load_pipeline(source, 2), NUM_BLOCKS, BLOCK_SIZE), vocab)
    half = _run_schedule(
        PagedRunner(load_pipeline(source, 2, "bfloat16"), NUM_BLOCKS, BLOCK_SIZE), vocab
    )
    for a, b in zip(full, half, strict=True):
        assert (a.logits[0] - b.logits[0]).abs().max().item() < 0.15
