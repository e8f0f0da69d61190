"""A tensor-parallel rank's rows or columns of a quantized GGUF matrix, read as blocks.

A GGUF row is a run of blocks (32 weights for Q4_0 ... Q8_0, 256 for the K types), so a
rank's output rows are whole rows of the file and its input columns are whole blocks;
only those bytes are read and decoded. ``GroupInts`` keeps one scale per 32 weights
whatever the block (molink.quant.gguf_blocks), so a column split must fall on a multiple
of 32: one that would cut a group is refused, naming the sizes, rather than rounded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from molink.errors import InvalidParameterError
from molink.quant.gguf_blocks import BLOCK_TYPES, GROUP, decode_blocks
from molink.quant.groups import GroupInts

Range = tuple[int, int]


def read_block_ranges(
    raw: np.ndarray,
    type_name: str,
    shape: tuple[int, int],
    order: np.ndarray | None,
    dim: int,
    ranges: Sequence[Range],
    what: str,
) -> GroupInts:
    """Rows (``dim`` 0) or columns (1) ``ranges`` of the [rows, cols] matrix in ``raw``.

    ``order``: the file row each row of the matrix is (llama.cpp's Q/K permutation undone);
    None when they are the same.
    """
    rows, cols = shape
    by_row = np.asarray(raw).reshape(rows, -1)
    if order is None:
        order = np.arange(rows)
    if dim == 0:
        picked = np.concatenate([order[start:stop] for start, stop in ranges] or [order[:0]])
        # Fancy indexing of the memory map reads only these rows' bytes.
        return decode_blocks(by_row[picked], type_name, len(picked), cols)
    parts = [_columns(by_row, order, type_name, start, stop, what) for start, stop in ranges]
    return parts[0] if len(parts) == 1 else cat_columns(parts)


def _columns(
    by_row: np.ndarray, order: np.ndarray, type_name: str, start: int, stop: int, what: str
) -> GroupInts:
    if start % GROUP or stop % GROUP:
        raise InvalidParameterError(
            "tensor_parallel_size",
            f"{what}: a rank's input columns [{start}, {stop}) would cut {type_name}'s "
            f"quantization groups of {GROUP} weights; choose a size whose share of this "
            f"matrix's inputs is a multiple of {GROUP}, or --tensor-parallel-size 1",
        )
    block_bytes, block_weights, _ = BLOCK_TYPES[type_name]
    first, last = start // block_weights, -(-stop // block_weights)
    blocks = by_row[order, first * block_bytes : last * block_bytes]
    ints = decode_blocks(blocks, type_name, len(order), (last - first) * block_weights)
    return narrow_columns(ints, start - first * block_weights, stop - first * block_weights)


def narrow_columns(ints: GroupInts, start: int, stop: int) -> GroupInts:
    """Columns [start, stop) of ``ints``, both on group boundaries."""
    g = ints.group
    n, k = ints.shape
    return GroupInts(
        ints.q[:, start:stop].contiguous(),
        ints.scale[:, start // g : stop // g].contiguous(),
        ints.offset[:, start // g : stop // g].contiguous(),
        g,
        ints.source_type,
        ints.file_bytes * (stop - start) // max(1, k),
    )


def cat_columns(parts: Sequence[GroupInts]) -> GroupInts:
    """Matrices side by side along the inputs (a rank's several column ranges)."""
    first = parts[0]
    return GroupInts(
        torch.cat([p.q for p in parts], dim=1),
        torch.cat([p.scale for p in parts], dim=1),
        torch.cat([p.offset for p in parts], dim=1),
        first.group,
        first.source_type,
        sum(p.file_bytes for p in parts),
    )
