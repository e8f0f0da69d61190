"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket (as vLLM does).

At small models a decode step is mostly kernel-launch overhead; a graph launches the
whole slice at once. At start, each bucket size (1, 2, 4, 8, then every 8 up to the
largest batch) is captured on static buffers: token ids or hidden states, positions, slot
ids, the block table (as wide as ``max_model_len`` needs) and context lengths. A step of
only single-token chunks whose batch fits a bucket copies its inputs into those buffers
and replays the smallest bucket that holds it; the rows past the batch repeat its first
row (same token, position and slot, so they write the same values to the same slot).
Any other step (prefill, a batch larger than the largest bucket) runs eagerly.

``graph_factory`` makes the graph objects: ``torch.cuda.CUDAGraph`` on a GPU; tests on a
CPU pass one that records the forward and re-runs it, which checks everything around the
capture (buckets, padding, buffers, slicing) without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

import torch

from molink.models.attention_metadata import AttentionMetadata, DecodeGroup, SeqChunk
from molink.models.blocks.moe import MoE
from molink.models.decoder import DecoderSlice
from molink.models.kv_cache import KVCache

logger = logging.getLogger(__name__)


class Graph(Protocol):
    """What a captured graph offers (torch.cuda.CUDAGraph's shape)."""

    def replay(self) -> None: ...


class GraphFactory(Protocol):
    def new(self) -> Graph: ...

    def capture(self, graph: Graph, fn: Callable[[], None]) -> None:
        """Record ``fn`` into ``graph`` (it may run ``fn`` to do so)."""


class CudaGraphFactory:
    """torch.cuda graphs sharing one memory pool across buckets."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = None

    def new(self) -> Graph:
        return torch.cuda.CUDAGraph()

    def capture(self, graph: Graph, fn: Callable[[], None]) -> None:
        fn()  # warm-up outside the graph: Triton compiles, cuBLAS picks its kernels
        torch.cuda.synchronize(self.device)
        context: AbstractContextManager = torch.cuda.graph(graph, pool=self.pool)  # type: ignore[arg-type]
        with context:
            fn()
        self.pool = graph.pool()  # type: ignore[attr-defined]


def bucket_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to ``max_batch`` (included, rounded up to a multiple of 8)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch]
    sizes += list(range(8, max_batch + 8, 8)) if max_batch > 4 else [max_batch]
    return sorted(set(sizes))


def pick_bucket(sizes: list[int], batch: int) -> int | None:
    """The smallest bucket that holds ``batch``; None above the largest."""
    for size in sizes:
        if size >= batch:
            return size
    return None


@dataclass(frozen=True)
class GraphSettings:
    """Capture decode graphs for batches up to ``max_batch`` (--max-num-seqs, at most
    ``MAX_CAPTURED_BATCH``) and contexts up to ``max_model_len``."""

    max_batch: int
    max_model_len: int
    factory: GraphFactory


MAX_CAPTURED_BATCH = 256


def capture_decode_graphs(
    model: torch.nn.Module, kv_cache: KVCache, settings: GraphSettings | None
) -> DecodeGraphs | None:
    """The slice's decode graphs, or None (eager) when none are asked for or capture fails
    (a layer that reads values back to the host, e.g. experts counting their tokens)."""
    if settings is None or not isinstance(model, DecoderSlice):
        return None
    if any(isinstance(module, MoE) for module in model.modules()):
        # Experts split their tokens by counts read back to the host: not capturable.
        logger.info("decode steps run eagerly: mixture-of-experts layers")
        return None
    if any(tables.depends_on_length for tables in model.rotaries.values()):
        # Rotations that follow each sequence's length are computed from the step's chunks.
        logger.info("decode steps run eagerly: rotary angles depend on sequence lengths")
        return None
    try:
        graphs = DecodeGraphs(
            model,
            kv_cache,
            min(settings.max_batch, MAX_CAPTURED_BATCH),
            settings.max_model_len,
            settings.factory,
        )
    except RuntimeError as exc:
        logger.warning("decode steps run eagerly: capturing CUDA graphs failed: %s", exc)
        return None
    logger.info("captured decode graphs for batch sizes %s", graphs.sizes)
    return graphs


@dataclass
class _Captured:
    graph: Graph
    output: torch.Tensor


class DecodeGraphs:
    """Replays single-token steps of ``model`` from graphs captured per bucket."""

    def __init__(
        self,
        model: DecoderSlice,
        kv_cache: KVCache,
        max_batch: int,
        max_model_len: int,
        factory: GraphFactory,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = bucket_sizes(max_batch)
        self.block_size = kv_cache.block_size
        self.max_model_len = max_model_len
        largest, device = self.sizes[-1], model.device
        width = -(-max_model_len // self.block_size)
        if model.is_first:
            self.inputs = torch.zeros(largest, dtype=torch.long, device=device)
        else:
            self.inputs = torch.zeros(
                largest, model.config.hidden_size, dtype=model.dtype, device=device
            )
        self.positions = torch.zeros(largest, dtype=torch.long, device=device)
        self.slots = torch.zeros(largest, dtype=torch.long, device=device)
        self.table = torch.zeros(largest, width, dtype=torch.long, device=device)
        self.lengths = torch.ones(largest, dtype=torch.int32, device=device)
        hidden = model.config.hidden_size
        self.output = torch.zeros(largest, hidden, dtype=model.dtype, device=device)
        self._metas = {size: self._static_meta(size) for size in self.sizes}
        self._graphs: dict[int, _Captured] = {}
        for size in reversed(self.sizes):  # largest first: later ones reuse its memory
            self._graphs[size] = self._capture(size, factory)

    def _static_meta(self, size: int) -> AttentionMetadata:
        """Metadata over the static buffers; its chunks claim the longest context, so that
        every layer takes the branches a long sequence takes (sliding windows)."""
        chunks = tuple(SeqChunk(self.max_model_len - 1, 1, [0]) for _ in range(size))
        decode = DecodeGroup(
            rows=slice(0, size),
            batch_size=size,
            block_table=self.table[:size].view(-1),
            context_len=self.max_model_len,
            mask=None,
            lengths=self.lengths[:size],
            in_kernel=True,
        )
        return AttentionMetadata(
            chunks, self.block_size, self.positions[:size], self.slots[:size], decode, (), None
        )

    def _capture(self, size: int, factory: GraphFactory) -> _Captured:
        graph = factory.new()

        def step() -> None:
            out = self.model(self.inputs[:size], self._metas[size], self.kv_cache)
            # Into a buffer allocated outside the graph: its address is what replays fill.
            self.output[:size].copy_(out)

        factory.capture(graph, step)
        return _Captured(graph, self.output[:size])

    def can_run(self, meta: AttentionMetadata) -> bool:
        decode = meta.decode
        return (
            decode is not None
            and decode.in_kernel
            and not meta.prefills
            and not meta.in_place
            and decode.rows == slice(0, decode.batch_size)
            and pick_bucket(self.sizes, decode.batch_size) is not None
            and meta.max_context_len <= self.max_model_len
        )

    def run(self, inputs: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The slice's output for a step ``can_run`` accepted."""
        decode = meta.decode
        assert decode is not None
        batch = decode.batch_size
        size = pick_bucket(self.sizes, batch)
        assert size is not None
        self._fill(self.inputs, inputs, batch, size)
        self._fill(self.positions, meta.positions, batch, size)
        self._fill(self.slots, meta.slot_mapping, batch, size)
        self._fill(self.lengths, decode.lengths, batch, size)
        table = decode.block_table.view(batch, -1)
        self.table[:batch, : table.shape[1]].copy_(table)
        self.table[batch:size, : table.shape[1]].copy_(table[:1].expand(size - batch, -1))
        captured = self._graphs[size]
        captured.graph.replay()
        # The next replay overwrites the output buffer: hand out a copy.
        return captured.output[:batch].clone()

    @staticmethod
    def _fill(static: torch.Tensor, values: torch.Tensor, batch: int, size: int) -> None:
        static[:batch].copy_(values)
        if size > batch:
            static[batch:size].copy_(values[:1].expand(size - batch, *values.shape[1:]))
