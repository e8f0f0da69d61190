"""A tensor-parallel rank other than 0: loads its shard, then repeats rank 0's forwards.

Started by rank 0 (molink.parallel.launch) as ``python -m molink.parallel.follower``; it
never talks to the pipeline, only to the other ranks of its stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import torch

from molink.config import LayerRange, ModelConfig
from molink.errors import MolinkError
from molink.models.decoder import DecoderSlice
from molink.models.kv_cache import KVCache
from molink.models.parallel.check import rank_kv_config
from molink.models.parallel.group import ParallelGroup, rank_device
from molink.parallel.commands import CommandChannel, Kind
from molink.parallel.launch import exit_with_parent, join_group, open_store

logger = logging.getLogger(__name__)


def follow(model: DecoderSlice, kv_cache: KVCache, channel: CommandChannel) -> int:
    """Run rank 0's commands until STOP; returns how many were run."""
    count = 0
    while True:
        header = channel.receive_header()
        if header.kind == Kind.STOP:
            return count
        count += 1
        try:
            if header.kind == Kind.FORWARD:
                inputs, meta = channel.receive_forward(header)
                model(inputs, meta, kv_cache)
            else:
                model.compute_logits(channel.receive_logits(header))
        except MolinkError as exc:
            # Rank 0 runs the same checks on the same inputs and reports the error.
            logger.debug("command %d failed as on rank 0: %s", count, exc)


def rank_kv_cache(
    args: argparse.Namespace, config: ModelConfig, model_dtype: torch.dtype, device: torch.device
) -> KVCache:
    """This rank's cache: rank 0's blocks and dtype for its share of the KV heads, on this
    rank's own device (which decides whether an fp8 cache is allowed, as on rank 0)."""
    from molink.quant.config import resolve_kv_cache_dtype

    return KVCache.allocate(
        rank_kv_config(config, args.tensor_parallel_size),
        args.end_layer - args.start_layer,
        args.num_blocks,
        args.block_size,
        resolve_kv_cache_dtype(args.kv_cache_dtype, model_dtype, device),
        device,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="molink.parallel.follower")
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--start-layer", type=int, required=True)
    parser.add_argument("--end-layer", type=int, required=True)
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--kv-cache-dtype", required=True)
    parser.add_argument("--num-blocks", type=int, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--quantization", default="none")
    parser.add_argument("--quantized-batch-kernel", default="int4")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s %(levelname)s tp-rank-{args.rank} %(name)s: %(message)s",
    )
    exit_with_parent()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    # Imported here: resolving a model pulls in the weight formats and tokenizers.
    from molink.quant.memory import return_freed_memory
    from molink.weights import resolve_model_source

    # The stage's device names rank 0's; CUDA ranks take the devices after it.
    size, device = args.tensor_parallel_size, rank_device(torch.device(args.device), args.rank)
    store = open_store(args.rank, size, args.port)
    source = resolve_model_source(args.model, quantization=args.quantization)
    config = source.model_config
    layers = LayerRange(args.start_layer, args.end_layer)
    plan = ParallelGroup(args.rank, size, device)
    model = source.load_slice(
        layers, args.dtype, device, args.quantization, plan, args.quantized_batch_kernel
    )
    kv_cache = rank_kv_cache(args, config, model.dtype, device)
    return_freed_memory()  # what loading freed (molink.quant.memory)
    store.set(f"ready/{args.rank}", "1")
    group = join_group(store, args.rank, size, device)
    channel = CommandChannel(group, model.dtype, config.hidden_size)
    count = follow(model, kv_cache, channel)
    logger.info("stopping after %d commands", count)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
