"""What rank 0 of a tensor-parallel stage tells the other ranks before each collective call.

Only rank 0 talks to the pipeline; the other ranks run the same forward passes over their
shards, so before each one rank 0 broadcasts what it needs, as tensors of an explicit,
versioned layout (never pickled objects: ``broadcast_object_list`` would unpickle):

    header  int64[8]: version, kind, rows, chunks, block ids, block size, window, ids?
    FORWARD chunks int64[chunks, 3] (start position, new tokens, blocks of the table),
            block ids int64[block ids] (the tables, one after the other),
            inputs: token ids int64[rows] or hidden states [rows, hidden] in the model dtype
    LOGITS  hidden states [rows, hidden] in the model dtype
    STOP    nothing more
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molink.errors import ProtocolError
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.parallel.group import ParallelGroup

SCHEMA_VERSION = 1
HEADER_LEN = 8
NO_WINDOW = -1
# Bounds a follower checks before allocating what a header announces.
MAX_ROWS = 1 << 24
MAX_BLOCK_IDS = 1 << 26


class Kind(enum.IntEnum):
    FORWARD = 1
    LOGITS = 2
    STOP = 3


@dataclass(frozen=True)
class Header:
    kind: Kind
    rows: int = 0
    chunks: int = 0
    block_ids: int = 0
    block_size: int = 0
    window: int = NO_WINDOW
    token_ids: bool = False

    def encode(self) -> torch.Tensor:
        values = [SCHEMA_VERSION, int(self.kind), self.rows, self.chunks, self.block_ids]
        values += [self.block_size, self.window, int(self.token_ids)]
        return torch.tensor(values, dtype=torch.int64)

    @classmethod
    def decode(cls, tensor: torch.Tensor) -> Header:
        version, kind, rows, chunks, block_ids, block_size, window, ids = tensor.tolist()
        if version != SCHEMA_VERSION:
            raise ProtocolError(
                f"tensor-parallel command schema {version}; this rank speaks {SCHEMA_VERSION}"
            )
        if kind not in {k.value for k in Kind}:
            raise ProtocolError(f"unknown tensor-parallel command {kind}")
        if not (0 <= rows <= MAX_ROWS and 0 <= chunks <= rows and 0 <= block_ids <= MAX_BLOCK_IDS):
            raise ProtocolError(f"tensor-parallel command out of bounds: {tensor.tolist()}")
        return cls(Kind(kind), rows, chunks, block_ids, block_size, window, bool(ids))


def encode_chunks(chunks: Sequence[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor]:
    table = torch.tensor(
        [[c.start_pos, c.num_tokens, len(c.block_ids)] for c in chunks], dtype=torch.int64
    ).reshape(len(chunks), 3)
    block_ids = torch.tensor([b for c in chunks for b in c.block_ids], dtype=torch.int64)
    return table, block_ids


def decode_chunks(table: torch.Tensor, block_ids: torch.Tensor) -> list[SeqChunk]:
    ids = block_ids.tolist()
    if sum(int(n) for n in table[:, 2].tolist()) != len(ids):
        raise ProtocolError("tensor-parallel command: block tables do not add up")
    chunks, offset = [], 0
    for start, count, num_blocks in table.tolist():
        chunks.append(SeqChunk(start, count, ids[offset : offset + num_blocks]))
        offset += num_blocks
    return chunks


class CommandChannel:
    """Rank 0 sends commands; the other ranks receive them in the same order."""

    def __init__(self, group: ParallelGroup, dtype: torch.dtype, hidden_size: int) -> None:
        self.group = group
        self.dtype = dtype
        self.hidden_size = hidden_size

    # Empty tensors are not sent: both sides know their shapes from the header.
    def _send(self, tensor: torch.Tensor) -> None:
        if tensor.numel():
            self.group.broadcast(tensor.to(self.group.device).contiguous())

    def _receive(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(tuple(shape), dtype=dtype, device=self.group.device)
        return self.group.broadcast(tensor) if tensor.numel() else tensor

    # --- rank 0 ----------------------------------------------------------------------

    def send_forward(self, inputs: torch.Tensor, meta: AttentionMetadata) -> None:
        table, block_ids = encode_chunks(meta.chunks)
        token_ids = inputs.dtype == torch.int64
        window = NO_WINDOW if meta.sliding_window is None else meta.sliding_window
        header = Header(
            Kind.FORWARD,
            inputs.shape[0],
            len(table),
            len(block_ids),
            meta.block_size,
            window,
            token_ids,
        )
        self._send(header.encode())
        self._send(table)
        self._send(block_ids)
        self._send(inputs if token_ids else inputs.to(self.dtype))

    def send_logits(self, hidden: torch.Tensor) -> None:
        self._send(Header(Kind.LOGITS, hidden.shape[0]).encode())
        self._send(hidden.to(self.dtype))

    def send_stop(self) -> None:
        self._send(Header(Kind.STOP).encode())

    # --- the other ranks -------------------------------------------------------------

    def receive_header(self) -> Header:
        return Header.decode(self._receive((HEADER_LEN,), torch.int64).cpu())

    def receive_forward(self, header: Header) -> tuple[torch.Tensor, AttentionMetadata]:
        table = self._receive((header.chunks, 3), torch.int64).cpu()
        block_ids = self._receive((header.block_ids,), torch.int64).cpu()
        if header.token_ids:
            inputs = self._receive((header.rows,), torch.int64)
        else:
            inputs = self._receive((header.rows, self.hidden_size), self.dtype)
        chunks = decode_chunks(table, block_ids)
        window = None if header.window == NO_WINDOW else header.window
        meta = AttentionMetadata.build(chunks, header.block_size, sliding_window=window)
        return inputs, meta

    def receive_logits(self, header: Header) -> torch.Tensor:
        return self._receive((header.rows, self.hidden_size), self.dtype)
