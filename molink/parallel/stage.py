"""Loading a stage's layers on rank 0, with its tensor-parallel ranks when it has several."""

from __future__ import annotations

import dataclasses

import torch

from molink.config import LayerRange
from molink.models.decoder import DecoderSlice
from molink.models.parallel.check import check_tensor_parallel
from molink.models.parallel.group import ParallelGroup, rank_devices
from molink.parallel.launch import Followers, FollowerSettings
from molink.quant.config import resolve_quantization
from molink.weights.source import ModelSource


def load_stage_slice(
    source: ModelSource,
    layers: LayerRange,
    dtype: str,
    quantization: str | None,
    tensor_parallel_size: int,
    settings: FollowerSettings,
    device: torch.device | str = "cpu",
    batch_kernel: str = "int4",
) -> DecoderSlice:
    """The slice ``layers``; with several ranks, rank 0's shard, the others started and
    joined (they follow every forward of the returned slice; ``slice.leader.close()``
    stops them, as does this process's exit)."""
    if tensor_parallel_size == 1:
        return source.load_slice(
            layers, dtype, device, quantization=quantization, batch_kernel=batch_kernel
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    method = resolve_quantization(quantization, source.detected_quantization(), device)
    check_tensor_parallel(source.model_config, tensor_parallel_size, method)
    rank_devices(device, tensor_parallel_size)  # before any rank starts
    # The other ranks follow this rank's device (CUDA: the next devices after it) and load
    # their shares of the same weights, quantized as this rank's are.
    settings = dataclasses.replace(
        settings, device=str(device), quantization=method, quantized_batch_kernel=batch_kernel
    )
    followers = Followers(tensor_parallel_size, settings)
    try:
        plan = ParallelGroup(0, tensor_parallel_size, device)
        model = source.load_slice(layers, dtype, device, method, plan, batch_kernel)
        followers.connect(device, model.dtype, source.model_config.hidden_size)
    except BaseException:
        followers.close()
        raise
    model.leader = followers
    return model
