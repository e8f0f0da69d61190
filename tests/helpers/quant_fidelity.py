"""Teacher-forced next-token agreement of a quantized model with its float references.

20 prompts x 64 tokens: the float32 model's own greedy continuations of random prompts
are fed to every model under test (the same tokens on every side, so a near-tie cannot
send two runs apart), and each position's top-1 prediction is compared. The float32
reference is cached on disk, keyed by the file, torch's version and the prompts, so a
warm run loads only the quantized model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from molink.models import DecoderSlice, SeqChunk
from molink.weights.cache import default_cache_dir, file_key
from tests.helpers.paged_runner import PagedRunner, Seq

NUM_PROMPTS, NEW_TOKENS, PROMPT_TOKENS = 20, 64, 12
BLOCK = 16


def prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(100, vocab - 100, (PROMPT_TOKENS,), generator=gen).tolist()
            for _ in range(NUM_PROMPTS)]  # fmt: skip


def blocks(index: int, length: int) -> list[int]:
    per_seq = -(-length // BLOCK)
    return list(range(index * per_seq, (index + 1) * per_seq))


def continuations(model: DecoderSlice, starts: list[list[int]]) -> list[list[int]]:
    total = PROMPT_TOKENS + NEW_TOKENS
    runner = PagedRunner([model], NUM_PROMPTS * -(-total // BLOCK), BLOCK)
    seqs = [Seq(list(p), blocks(i, total)) for i, p in enumerate(starts)]
    runner.step([(s, len(s.tokens)) for s in seqs])
    runner.decode(seqs, NEW_TOKENS)
    return [s.tokens[:total] for s in seqs]


def teacher_forced(slices: Sequence[DecoderSlice], sequences: list[list[int]]) -> torch.Tensor:
    """Top-1 predictions [sequences, NEW_TOKENS] for the last NEW_TOKENS positions.

    As a server runs them: the prompts in one prefill, then one decode step per position
    for all sequences together (20 rows), fed the given tokens."""
    length = len(sequences[0])
    runner = PagedRunner(slices, len(sequences) * -(-length // BLOCK), BLOCK)
    tables = [blocks(i, length) for i in range(len(sequences))]
    chunks = [SeqChunk(0, PROMPT_TOKENS, b) for b in tables]
    hidden = runner.forward(chunks, [t for seq in sequences for t in seq[:PROMPT_TOKENS]])
    last = hidden[PROMPT_TOKENS - 1 :: PROMPT_TOKENS]
    predictions = [slices[-1].compute_logits(last).argmax(-1)]
    for pos in range(PROMPT_TOKENS, length - 1):
        chunks = [SeqChunk(pos, 1, b) for b in tables]
        hidden = runner.forward(chunks, [seq[pos] for seq in sequences])
        predictions.append(slices[-1].compute_logits(hidden).argmax(-1))
    return torch.stack(predictions, dim=1)


def teacher_forced_prefill(model: DecoderSlice, sequences: list[list[int]]) -> torch.Tensor:
    """The same predictions as ``teacher_forced`` from one prefill per sequence: a float
    reference computed in large products (a decode step at 20 rows is ~10x slower)."""
    length = len(sequences[0])
    runner = PagedRunner([model], -(-length // BLOCK), BLOCK)
    rows = []
    for seq in sequences:
        hidden = runner.forward([SeqChunk(0, length - 1, blocks(0, length))], seq[: length - 1])
        positions = hidden[PROMPT_TOKENS - 1 :]
        rows.append(
            torch.cat([model.compute_logits(part).argmax(-1) for part in positions.split(16)])
        )
    return torch.stack(rows)


def float32_reference(
    gguf_path: Path, vocab: int, load: Callable[[], DecoderSlice]
) -> dict[str, list]:
    """{"sequences": float32 greedy continuations, "float32": their teacher-forced
    predictions}, cached on disk."""
    starts = prompts(vocab)
    ident = json.dumps([file_key(gguf_path), torch.__version__, starts, NEW_TOKENS, "prefill"])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cached = default_cache_dir() / "test-references" / f"{gguf_path.stem}-fidelity-{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    float32 = load()
    sequences = continuations(float32, starts)
    result = {
        "sequences": sequences,
        "float32": teacher_forced_prefill(float32, sequences).tolist(),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


def agreement(got: torch.Tensor, reference: list) -> float:
    return float((got == torch.tensor(reference)).float().mean())
