"""safetensors files whose tensors start on cache-line boundaries, for weights read in place.

The packed cache's matrices are used as views of the mapped file (no copy), so a tensor's
address in memory is the file's mapping plus its offset. safetensors pads its JSON header
to 8 bytes only: data then starts at an arbitrary multiple of 8, and every vector load of
torch's int4 kernel straddles two cache lines. Measured on SmolLM2's LM head (one thread,
the same bytes at different addresses, medians of 40 products): 1.85-1.94 ms 64-byte
aligned (mapped file or anonymous memory alike), 2.05-2.16 ms at 56 bytes past a line.

The header may carry trailing whitespace (the format allows it, and the library's own
8-byte padding is spaces), but the library does not take an alignment. So a file is
serialized once, and where its data section would start off a boundary, again with a
metadata entry of spaces that long: the tensors' offsets within the data section do not
change, so each tensor whose offset is a multiple of ``ALIGN`` is aligned. Offsets are
multiples of 64 whenever the tensors before it are (int4 planes, their scales and the
norms of every real model's shapes are); ``aligned`` copies a tensor that is not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save

ALIGN = 64
PAD_KEY = "molink.align"


def _data_start(data: bytes) -> int:
    """Where the data section of serialized safetensors ``data`` starts."""
    return 8 + int.from_bytes(data[:8], "little")


def serialize(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """``tensors`` as safetensors bytes whose data section starts at a multiple of ALIGN."""
    data = save(tensors, metadata={**metadata, PAD_KEY: ""})
    short = -_data_start(data) % ALIGN
    if short == 0:
        return data
    del data  # a part of a large model is hundreds of MiB: never two copies at once
    # The library pads the header to 8 bytes, so ``short`` (a multiple of 8) more spaces
    # in one value move the data section exactly that far.
    return save(tensors, metadata={**metadata, PAD_KEY: " " * short})


def write(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    Path(path).write_bytes(serialize(tensors, metadata))


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself where it starts on an ALIGN boundary, else an aligned copy (torch's
    CPU allocations are 64-byte aligned)."""
    if tensor.data_ptr() % ALIGN == 0 or tensor.numel() == 0:
        return tensor
    return tensor.clone()
