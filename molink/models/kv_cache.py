"""Paged key/value storage for the decoder layers one stage holds.

Block ids come from the head (see molink.step); this class only stores the tensors. Every
local layer has a key tensor ``[num_blocks, block_size, heads, key_dim]`` and a value tensor
``[num_blocks, block_size, heads, value_dim]``, with heads and dims from the architecture's
``KVLayout`` (multi-head latent attention caches one latent "head" and no separate values);
token ``p`` of a sequence lives in block ``block_ids[p // block_size]`` at offset
``p % block_size``.
"""

from __future__ import annotations

import math
import mmap

import torch

from molink.config import ModelConfig
from molink.errors import InvalidParameterError
from molink.models.registry import architecture_for

# Below this, a CPU cache is plain torch.zeros (a mapping's page granularity buys nothing).
LAZY_ZERO_MIN_BYTES = 1 << 20


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zero tensor. On a CPU, a large one lies in an anonymous memory mapping, whose
    pages the kernel hands out zeroed when first touched: the cache then holds resident
    memory for the blocks sequences have used, not for all of them from the start
    (``torch.zeros`` writes every page at once), and untouched padding still reads as 0."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < LAZY_ZERO_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    # The tensor keeps the mapping alive (torch.frombuffer holds a reference to it); the
    # mapping is unmapped when the last view of the cache is gone.
    buffer = mmap.mmap(-1, nbytes)
    return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape)


class KVCache:
    def __init__(
        self, storage: torch.Tensor, block_size: int, value_storage: torch.Tensor | None = None
    ) -> None:
        # With equal key and value dims, storage is [layers, 2, blocks, block_size, heads, dim]:
        # one allocation keeps a layer's keys and values next to each other. Otherwise
        # storage holds the keys [layers, blocks, ...] and value_storage the values.
        self.storage = storage
        self.value_storage = value_storage
        self.block_size = block_size
        if value_storage is None:
            self.keys = [storage[i, 0] for i in range(storage.shape[0])]
            self.values = [storage[i, 1] for i in range(storage.shape[0])]
        else:
            self.keys = [storage[i] for i in range(storage.shape[0])]
            self.values = [value_storage[i] for i in range(value_storage.shape[0])]

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_local_layers: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Zero-filled storage, so that padding slots read by batched attention stay finite."""
        if num_local_layers < 1:
            raise InvalidParameterError("num_local_layers", "must be >= 1")
        if num_blocks < 1:
            raise InvalidParameterError("num_blocks", "must be >= 1")
        if block_size < 1:
            raise InvalidParameterError("block_size", "must be >= 1")
        layout = architecture_for(config).kv_layout(config)
        head = (num_blocks, block_size, layout.num_heads)
        if layout.key_dim == layout.value_dim:
            shape = (num_local_layers, 2, *head, layout.key_dim)
            return cls(zeroed(shape, dtype, device), block_size)
        keys = zeroed((num_local_layers, *head, layout.key_dim), dtype, device)
        values = zeroed((num_local_layers, *head, layout.value_dim), dtype, device)
        return cls(keys, block_size, values)

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, num_local_layers: int, block_size: int, dtype: torch.dtype
    ) -> int:
        layout = architecture_for(config).kv_layout(config)
        element_size = torch.empty((), dtype=dtype).element_size()
        per_token = layout.num_heads * (layout.key_dim + layout.value_dim) * element_size
        return num_local_layers * block_size * per_token

    @property
    def nbytes(self) -> int:
        values = self.value_storage
        extra = 0 if values is None else values.numel() * values.element_size()
        return self.storage.numel() * self.storage.element_size() + extra

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_blocks(self) -> int:
        return self.keys[0].shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device
