"""Sizing a GPU stage's paged KV cache as vLLM does: ``--gpu-memory-utilization``.

After the weights are loaded, one forward at the largest batch the scheduler may send
(``--max-num-batched-tokens`` tokens spread over ``--max-num-seqs`` sequences, plus their
logits on the last stage) measures the peak activation memory. What is left of
``utilization x total`` after the weights, that peak and the memory outside torch's
allocator (CUDA context, other processes) holds the KV blocks. ``--max-model-len`` and
``--max-num-seqs`` are then checked against the blocks that fit, with an error that says
which does not fit and by how much.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from molink.errors import InvalidParameterError
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.decoder import DecoderSlice
from molink.models.kv_cache import KVCache
from molink.progress import progress_bar

logger = logging.getLogger(__name__)

GIB = 1024**3


class DeviceMemory(Protocol):
    """What the profiler reads from a device's allocator."""

    def total_bytes(self) -> int: ...

    def free_bytes(self) -> int: ...

    def allocated_bytes(self) -> int: ...

    def reserved_bytes(self) -> int: ...

    def reset_peak(self) -> None: ...

    def peak_bytes(self) -> int: ...


class CudaMemory:
    """torch's caching allocator on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def total_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[1]

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def reserved_bytes(self) -> int:
        return torch.cuda.memory_reserved(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)


@dataclass(frozen=True)
class ProfileLimits:
    utilization: float  # --gpu-memory-utilization
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int
    block_size: int


@dataclass(frozen=True)
class MemoryProfile:
    total: int
    weights: int  # what torch held after loading: the weights (and small tables)
    peak_activation: int  # the profiling forward's peak above that
    outside_torch: int  # used on the device but not by this process's allocator

    def kv_budget(self, utilization: float) -> int:
        return (
            int(self.total * utilization) - self.weights - self.peak_activation - self.outside_torch
        )

    def describe(self, utilization: float) -> str:
        return (
            f"{utilization} x {self.total / GIB:.2f} GiB = {self.total * utilization / GIB:.2f} "
            f"GiB, of which weights take {self.weights / GIB:.2f} GiB, activations at the "
            f"largest batch {self.peak_activation / GIB:.2f} GiB and memory outside torch "
            f"{self.outside_torch / GIB:.2f} GiB"
        )


def dummy_chunks(limits: ProfileLimits) -> list[SeqChunk]:
    """``max_num_batched_tokens`` new tokens over ``max_num_seqs`` sequences (each >= 1)."""
    seqs = min(limits.max_num_seqs, limits.max_num_batched_tokens)
    base, extra = divmod(limits.max_num_batched_tokens, seqs)
    chunks, next_block = [], 0
    for index in range(seqs):
        tokens = base + (1 if index < extra else 0)
        blocks = -(-tokens // limits.block_size)
        chunks.append(SeqChunk(0, tokens, list(range(next_block, next_block + blocks))))
        next_block += blocks
    return chunks


def profile_forward(model: DecoderSlice, limits: ProfileLimits, kv_dtype: torch.dtype) -> int:
    """Run the largest batch once; returns the bytes of the temporary cache it used."""
    chunks = dummy_chunks(limits)
    num_blocks = sum(len(c.block_ids) for c in chunks)
    cache = KVCache.allocate(
        model.config, model.num_local_layers, num_blocks, limits.block_size, kv_dtype, model.device
    )
    meta = AttentionMetadata.build(chunks, limits.block_size, device=model.device)
    num_tokens = limits.max_num_batched_tokens
    if model.is_first:
        inputs = torch.zeros(num_tokens, dtype=torch.long, device=model.device)
    else:
        inputs = torch.zeros(
            num_tokens, model.config.hidden_size, dtype=model.dtype, device=model.device
        )
    hidden = model(inputs, meta, cache)
    if model.is_last:  # one sampled row per sequence
        model.compute_logits(hidden[: len(chunks)])
    return cache.nbytes


def profile_memory(
    models: list[DecoderSlice], limits: ProfileLimits, kv_dtype: torch.dtype, memory: DeviceMemory
) -> MemoryProfile:
    """Weights and peak activation memory of ``models`` (the slices this process runs on
    one device), measured by one forward of each at the largest batch."""
    with progress_bar(len(models) + 1, "profiling KV cache memory", unit="step") as bar:
        weights = memory.allocated_bytes()
        bar.update(1)
        peak = 0
        for model in models:
            memory.reset_peak()
            before = memory.allocated_bytes()
            try:
                scratch = profile_forward(model, limits, kv_dtype)
            except torch.OutOfMemoryError as exc:
                raise InvalidParameterError(
                    "max_num_batched_tokens",
                    f"a batch of {limits.max_num_batched_tokens} tokens over "
                    f"{limits.max_num_seqs} sequences does not fit next to the weights "
                    f"({weights / GIB:.2f} GiB): lower --max-num-batched-tokens or "
                    "--max-num-seqs",
                ) from exc
            peak = max(peak, memory.peak_bytes() - before - scratch)
            bar.update(1)
    total = memory.total_bytes()
    # Used on the device but not held by this process's allocator: the CUDA context,
    # libraries' workspaces, other processes.
    outside = max(0, total - memory.free_bytes() - memory.reserved_bytes())
    return MemoryProfile(total, weights, max(peak, 0), outside)


def memory_probe(device: torch.device) -> DeviceMemory | None:
    """The device's allocator, where it can be read; None on a CPU (--kv-cache-memory)."""
    return CudaMemory(device) if device.type == "cuda" else None


def kv_blocks_that_fit(profile: MemoryProfile, limits: ProfileLimits, bytes_per_block: int) -> int:
    """Blocks for the budget, or a named error for what does not fit."""
    budget = profile.kv_budget(limits.utilization)
    if budget < bytes_per_block:
        raise InvalidParameterError(
            "gpu_memory_utilization",
            f"no room for the KV cache: {profile.describe(limits.utilization)}; raise "
            "--gpu-memory-utilization, or lower --max-num-batched-tokens / --max-num-seqs, "
            "or give this stage fewer layers",
        )
    num_blocks = budget // bytes_per_block
    capacity = num_blocks * limits.block_size
    if capacity < limits.max_model_len:
        raise InvalidParameterError(
            "max_model_len",
            f"{limits.max_model_len} tokens do not fit in the KV cache, which holds "
            f"{capacity} tokens ({num_blocks} blocks of {limits.block_size}) in "
            f"{profile.describe(limits.utilization)}; lower --max-model-len or raise "
            "--gpu-memory-utilization",
        )
    if num_blocks < limits.max_num_seqs:
        raise InvalidParameterError(
            "max_num_seqs",
            f"{limits.max_num_seqs} sequences need at least one KV block each, but "
            f"{num_blocks} blocks fit; lower --max-num-seqs or raise --gpu-memory-utilization",
        )
    logger.info(
        "KV cache: %d blocks of %d tokens (%.2f GiB) in %s",
        num_blocks,
        limits.block_size,
        num_blocks * bytes_per_block / GIB,
        profile.describe(limits.utilization),
    )
    return int(num_blocks)
