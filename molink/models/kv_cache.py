"""Paged key/value storage for the decoder layers one stage holds.

Block ids come from the head (see molink.step); this class only stores the tensors. Every
local layer has a key and a value tensor of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; token ``p`` of a sequence lives in
block ``block_ids[p // block_size]`` at offset ``p % block_size``.
"""

from __future__ import annotations

import torch

from molink.config import ModelConfig
from molink.errors import InvalidParameterError


class KVCache:
    def __init__(self, storage: torch.Tensor, block_size: int) -> None:
        # storage: [num_local_layers, 2, num_blocks, block_size, num_kv_heads, head_dim];
        # one allocation keeps a layer's keys and values next to each other.
        self.storage = storage
        self.block_size = block_size
        self.keys: list[torch.Tensor] = [storage[i, 0] for i in range(storage.shape[0])]
        self.values: list[torch.Tensor] = [storage[i, 1] for i in range(storage.shape[0])]

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
        shape = (
            num_local_layers,
            2,
            num_blocks,
            block_size,
            config.num_kv_heads,
            config.head_dim,
        )
        return cls(torch.zeros(shape, dtype=dtype, device=device), block_size)

    @staticmethod
    def bytes_per_block(
        config: ModelConfig, num_local_layers: int, block_size: int, dtype: torch.dtype
    ) -> int:
        element_size = torch.empty((), dtype=dtype).element_size()
        per_layer = 2 * block_size * config.num_kv_heads * config.head_dim * element_size
        return num_local_layers * per_layer

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def num_blocks(self) -> int:
        return self.storage.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    @property
    def device(self) -> torch.device:
        return self.storage.device
