"""Drive one or more DecoderSlices (a pipeline in one process) through paged steps.

Tests use it to check our decoders against transformers: the same batch goes through the
slices in order, each with its own KVCache, hidden states handed across the seams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from molink.config import LayerRange
from molink.models import AttentionMetadata, DecoderSlice, KVCache, SeqChunk
from molink.weights import ModelSource


@dataclass(eq=False)
class Seq:
    """A sequence under test: its tokens so far and its block table."""

    tokens: list[int]
    block_ids: list[int]
    num_computed: int = 0  # tokens already in the KV cache
    logits: list[torch.Tensor] = field(default_factory=list)  # one per sampled position


def split_ranges(num_layers: int, num_stages: int) -> list[LayerRange]:
    """``num_stages`` consecutive ranges covering every layer, as evenly as possible."""
    bounds = [round(i * num_layers / num_stages) for i in range(num_stages + 1)]
    return [LayerRange(a, b) for a, b in zip(bounds, bounds[1:], strict=False)]


def load_pipeline(
    source: ModelSource, num_stages: int, dtype: str = "float32"
) -> list[DecoderSlice]:
    return [
        source.load_slice(rng, dtype)
        for rng in split_ranges(source.model_config.num_layers, num_stages)
    ]


class PagedRunner:
    def __init__(
        self,
        slices: Sequence[DecoderSlice],
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        """``device``: where the slices' weights are (caches and inputs are put there)."""
        self.slices = list(slices)
        self.block_size = block_size
        self.device = torch.device(device)
        self.caches = [
            KVCache.allocate(
                s.config, s.num_local_layers, num_blocks, block_size, s.dtype, self.device
            )
            for s in self.slices
        ]

    def forward(self, chunks: Sequence[SeqChunk], token_ids: Sequence[int]) -> torch.Tensor:
        """Final hidden states [T, hidden] of the flattened batch."""
        meta = AttentionMetadata.build(chunks, self.block_size, device=self.device)
        x = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        for model, cache in zip(self.slices, self.caches, strict=True):
            x = model(x, meta, cache)
        return x

    def step(self, work: Sequence[tuple[Seq, int]]) -> list[torch.Tensor | None]:
        """Run ``num_new`` tokens of each sequence; greedily extend those that reach the end.

        Returns each sequence's logits for its last row (None while a prefill is partial).
        """
        chunks, token_ids = [], []
        for seq, num_new in work:
            start = seq.num_computed
            chunks.append(SeqChunk(start, num_new, seq.block_ids))
            token_ids.extend(seq.tokens[start : start + num_new])
        hidden = self.forward(chunks, token_ids)
        last_rows = torch.tensor(
            [sum(n for _, n in work[: i + 1]) - 1 for i in range(len(work))],
            dtype=torch.long,
            device=self.device,
        )
        logits = self.slices[-1].compute_logits(hidden[last_rows])
        results: list[torch.Tensor | None] = []
        for (seq, num_new), row in zip(work, logits, strict=True):
            seq.num_computed += num_new
            if seq.num_computed == len(seq.tokens):
                seq.logits.append(row)
                seq.tokens.append(int(row.argmax()))
                results.append(row)
            else:
                results.append(None)
        return results

    def decode(
        self, seqs: Sequence[Seq], max_tokens: int, order: Sequence[int] | None = None
    ) -> None:
        """Decode steps (all sequences batched) until each has ``max_tokens`` logits rows."""
        while True:
            active = [s for s in seqs if len(s.logits) < max_tokens]
            if not active:
                return
            if order is not None:
                active = [seqs[i] for i in order if seqs[i] in active]
            self.step([(s, 1) for s in active])
