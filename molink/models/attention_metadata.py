"""The index tensors of one forward over a flattened batch of sequence chunks.

A forward step carries, for every scheduled sequence, a chunk of new tokens. Rows of the
flattened batch follow the order of the chunks. ``AttentionMetadata.build`` turns the chunks
into the index tensors every layer needs, once per forward, and sorts them into the groups
that molink/models/attention.py attends:

* decode chunks (one new token) read the cache in place where they can: on CUDA through
  the Triton kernel for the whole batch (``DecodeGroup.in_kernel``); on a CPU, sequences of
  at least ``IN_PLACE_MIN_TOKENS`` one by one over views of their runs of slots
  (decode_plan.py). Shorter ones form one ``DecodeGroup``, attended in one batched call
  over a padded block table with a padding mask;
* prefill chunks (several new tokens) each form a ``PrefillGroup``: attended causally to the
  cached prefix and themselves. A chunk that starts at position 0 needs no block table.

Kept apart from the attention arithmetic because it is built once per step (and held by
the stage, the CUDA graphs and the tensor-parallel commands), while attention runs per layer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molink.errors import InvalidParameterError
from molink.models import decode_plan
from molink.models.decode_paths import use_triton
from molink.models.decode_plan import InPlaceDecode, plan_in_place


@dataclass(frozen=True)
class SeqChunk:
    start_pos: int  # tokens of this sequence already in the KV cache
    num_tokens: int  # new tokens of this sequence in this forward
    block_ids: Sequence[int]  # the sequence's whole block table (covers start_pos + num_tokens)


@dataclass(frozen=True)
class DecodeGroup:
    """Every single-token chunk of the batch, attended together."""

    rows: slice | torch.Tensor  # their rows in the flattened batch
    batch_size: int
    block_table: torch.Tensor  # [batch_size * blocks_per_seq], padded with block 0
    context_len: int  # longest context; gathered keys are cut to it
    mask: torch.Tensor | None  # [batch_size, 1, 1, context_len] bool; None: no padding
    lengths: torch.Tensor  # [batch_size] int32 context lengths, for kernels reading in place
    window: int | None = None
    in_kernel: bool = False  # True: a kernel reads the blocks in place (no gather, no mask)
    # A lone sequence whose blocks follow one another: its keys are slots
    # [run_start, run_start + context_len) of the cache, read in place (no gather).
    run_start: int | None = None


@dataclass(frozen=True)
class PrefillGroup:
    """One multi-token chunk of one sequence."""

    rows: slice
    block_table: torch.Tensor | None  # blocks covering the context; None: own keys only
    context_len: int
    mask: torch.Tensor | None  # [num_tokens, context_len] bool; None: plain causal


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_chunk(index: int, chunk: SeqChunk, block_size: int) -> None:
    if chunk.start_pos < 0 or chunk.num_tokens < 1:
        raise InvalidParameterError(
            "chunks",
            f"chunk {index}: start_pos must be >= 0 and num_tokens >= 1, "
            f"got start_pos={chunk.start_pos}, num_tokens={chunk.num_tokens}",
        )
    needed = _cdiv(chunk.start_pos + chunk.num_tokens, block_size)
    if len(chunk.block_ids) < needed:
        raise InvalidParameterError(
            "block_ids",
            f"chunk {index}: {chunk.start_pos + chunk.num_tokens} tokens need {needed} blocks "
            f"of {block_size}, but the block table has {len(chunk.block_ids)}",
        )


class AttentionMetadata:
    """Index tensors of one forward, shared by every layer of a stage.

    ``positions`` [T] and ``slot_mapping`` [T] (``block_id * block_size + offset``) cover
    every new token in chunk order. ``slot_run``: ``(first slot, T)`` where those slots
    follow one another (one decoding sequence, or one prompt's chunk in consecutive
    blocks), so that the new keys are written through a slice rather than an index.
    """

    def __init__(
        self,
        chunks: tuple[SeqChunk, ...],
        block_size: int,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        decode: DecodeGroup | None,
        prefills: tuple[PrefillGroup, ...],
        sliding_window: int | None,
        in_place: tuple[InPlaceDecode, ...] = (),
        slot_run: tuple[int, int] | None = None,
    ) -> None:
        self.chunks = chunks
        self.block_size = block_size
        self.positions = positions
        self.slot_mapping = slot_mapping
        self.decode = decode
        self.prefills = prefills
        self.in_place = in_place
        self.sliding_window = sliding_window
        self.slot_run = slot_run
        self.num_tokens = int(positions.shape[0])
        self.max_context_len = max(c.start_pos + c.num_tokens for c in chunks)

    @classmethod
    def build(
        cls,
        chunks: Sequence[SeqChunk],
        block_size: int,
        *,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
        kernel: bool | None = None,
    ) -> AttentionMetadata:
        """Precompute everything attention needs for ``chunks`` (rows in chunk order).

        ``sliding_window``: each token attends only to the last ``sliding_window`` positions
        (itself included), as Mistral does. Models apply their own window; callers leave it.
        ``kernel``: decodes read the cache through the paged-decode kernel (None: where
        Triton runs, i.e. on CUDA).
        """
        chunks = tuple(chunks)
        if not chunks:
            raise InvalidParameterError("chunks", "a forward needs at least one chunk")
        if block_size < 1:
            raise InvalidParameterError("block_size", "must be >= 1")
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_chunks: list[SeqChunk] = []
        prefills: list[PrefillGroup] = []
        in_place: list[InPlaceDecode] = []
        kernel = use_triton(torch.device(device)) if kernel is None else kernel
        for index, chunk in enumerate(chunks):
            _check_chunk(index, chunk, block_size)
            row = len(positions)
            end = chunk.start_pos + chunk.num_tokens
            block_ids = chunk.block_ids
            positions.extend(range(chunk.start_pos, end))
            slots.extend(
                block_ids[p // block_size] * block_size + p % block_size
                for p in range(chunk.start_pos, end)
            )
            if chunk.num_tokens == 1 and not kernel and end >= decode_plan.IN_PLACE_MIN_TOKENS:
                in_place.append(
                    plan_in_place(row, block_ids, end, block_size, sliding_window, device)
                )
            elif chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_chunks.append(chunk)
            else:
                prefills.append(_prefill_group(row, chunk, block_size, device, sliding_window))
        decode = (
            _decode_group(decode_rows, decode_chunks, block_size, device, sliding_window, kernel)
            if decode_chunks
            else None
        )
        return cls(
            chunks,
            block_size,
            torch.tensor(positions, dtype=torch.long, device=device),
            torch.tensor(slots, dtype=torch.long, device=device),
            decode,
            tuple(prefills),
            sliding_window,
            tuple(in_place),
            _slot_run(slots),
        )

    def with_sliding_window(self, window: int) -> AttentionMetadata:
        """The same batch with every token's attention limited to the last ``window`` positions."""
        decode = self.decode
        if decode is not None and decode.in_kernel and not self.prefills and not self.in_place:
            # The kernel applies the window itself: same tensors, so a captured CUDA graph
            # (molink/stage/decode_graphs.py) keeps reading the buffers it was captured on.
            return AttentionMetadata(
                self.chunks,
                self.block_size,
                self.positions,
                self.slot_mapping,
                dataclasses.replace(decode, window=window),
                (),
                window,
            )
        return AttentionMetadata.build(
            self.chunks,
            self.block_size,
            device=self.positions.device,
            sliding_window=window,
            kernel=decode.in_kernel if decode is not None else None,
        )


def _slot_run(slots: list[int]) -> tuple[int, int] | None:
    """``(first, count)`` where ``slots`` are consecutive, else None."""
    first = slots[0]
    if slots[-1] - first != len(slots) - 1 or slots != list(range(first, first + len(slots))):
        return None
    return first, len(slots)


def _decode_group(
    rows: list[int],
    chunks: list[SeqChunk],
    block_size: int,
    device: torch.device | str,
    window: int | None,
    kernel: bool = False,
) -> DecodeGroup:
    lengths = [c.start_pos + 1 for c in chunks]
    context_len = max(lengths)
    blocks_per_seq = _cdiv(context_len, block_size)
    table: list[int] = []
    for chunk, length in zip(chunks, lengths, strict=True):
        used = _cdiv(length, block_size)
        table.extend(chunk.block_ids[:used])
        table.extend([0] * (blocks_per_seq - used))
    mask = None
    needs_window = window is not None and context_len > window
    if not kernel and (needs_window or min(lengths) != context_len):
        lens = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
        key_pos = torch.arange(context_len, device=device)[None, :]
        mask = key_pos < lens
        if needs_window:
            mask &= key_pos >= lens - window
        mask = mask.view(len(chunks), 1, 1, context_len)
    first = rows[0]
    contiguous = rows == list(range(first, first + len(rows)))
    run_start = None
    if len(chunks) == 1 and mask is None and not kernel:
        run_start = _one_run(table, block_size)
    return DecodeGroup(
        rows=(
            slice(first, first + len(rows))
            if contiguous
            else torch.tensor(rows, dtype=torch.long, device=device)
        ),
        batch_size=len(chunks),
        block_table=torch.tensor(table, dtype=torch.long, device=device),
        context_len=context_len,
        mask=mask,
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        window=window,
        in_kernel=kernel,
        run_start=run_start,
    )


def _one_run(block_ids: list[int], block_size: int) -> int | None:
    """The first slot of ``block_ids`` if they follow one another (one run of slots)."""
    first = block_ids[0]
    if block_ids != list(range(first, first + len(block_ids))):
        return None
    return first * block_size


def _prefill_group(
    row: int,
    chunk: SeqChunk,
    block_size: int,
    device: torch.device | str,
    window: int | None,
) -> PrefillGroup:
    n = chunk.num_tokens
    context_len = chunk.start_pos + n
    rows = slice(row, row + n)
    if chunk.start_pos == 0 and (window is None or n <= window):
        return PrefillGroup(rows, None, context_len, None)
    used = _cdiv(context_len, block_size)
    table = torch.tensor(list(chunk.block_ids[:used]), dtype=torch.long, device=device)
    query_pos = torch.arange(chunk.start_pos, context_len, device=device)[:, None]
    key_pos = torch.arange(context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return PrefillGroup(rows, table, context_len, mask)
