"""Starting the other ranks of a tensor-parallel stage, and stopping them.

Rank 0 (the process that serves gRPC/HTTP) opens the rendezvous store on a free loopback
port, starts ranks 1..N-1 as child processes (``python -m molink.parallel.follower`` with
every setting on the command line), loads its own shard while they load theirs, and
waits until each has written ``ready/<rank>`` into the store, watching that none has
exited. Then all ranks join one process group. Followers exit when rank 0 sends STOP or
when rank 0's process is gone (they never outlive it).
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from molink.errors import MolinkError
from molink.models.attention_metadata import AttentionMetadata
from molink.models.parallel.group import IDLE_TIMEOUT, ParallelGroup, backend_for
from molink.parallel.commands import CommandChannel

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0  # loading a shard of a large model from a slow disk
STOP_TIMEOUT_S = 10.0
_POLL_S = 0.2


@dataclass(frozen=True)
class FollowerSettings:
    """What ranks 1..N-1 load: the same model, layers and cache as rank 0."""

    model: str | None
    start_layer: int
    end_layer: int
    dtype: str
    kv_cache_dtype: str
    num_blocks: int
    block_size: int
    device: str = "cpu"
    num_threads: int | None = None
    log_level: str = "info"
    quantization: str = "none"  # resolved: what rank 0 loads (molink.quant.config)
    quantized_batch_kernel: str = "int4"

    def argv(self, rank: int, size: int, port: int) -> list[str]:
        args = [sys.executable, "-m", "molink.parallel.follower"]
        args += ["--rank", str(rank), "--tensor-parallel-size", str(size), "--port", str(port)]
        if self.model is not None:
            args += ["--model", self.model]
        args += ["--start-layer", str(self.start_layer), "--end-layer", str(self.end_layer)]
        args += ["--dtype", self.dtype, "--kv-cache-dtype", self.kv_cache_dtype]
        args += ["--num-blocks", str(self.num_blocks), "--block-size", str(self.block_size)]
        args += ["--device", self.device, "--log-level", self.log_level]
        args += ["--quantization", self.quantization]
        args += ["--quantized-batch-kernel", self.quantized_batch_kernel]
        if self.num_threads is not None:
            args += ["--num-threads", str(self.num_threads)]
        return args


def open_store(rank: int, size: int, port: int) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1",
        port,
        size,
        rank == 0,
        timeout=timedelta(seconds=READY_TIMEOUT_S),
        wait_for_workers=False,
    )


def join_group(store: dist.Store, rank: int, size: int, device: torch.device) -> ParallelGroup:
    """Join the stage's group; ``device`` is this rank's own (see ``rank_device``)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=size, timeout=IDLE_TIMEOUT
    )
    return ParallelGroup(rank, size, device)


class Followers:
    """Ranks 1..N-1 of this stage, as child processes of rank 0 (a ``StepLeader`` once
    ``connect`` has joined the group)."""

    def __init__(self, size: int, settings: FollowerSettings) -> None:
        self.size = size
        self.store = open_store(0, size, 0)
        self.processes = [
            subprocess.Popen(settings.argv(rank, size, self.store.port)) for rank in range(1, size)
        ]
        logger.info("started tensor-parallel ranks 1..%d (pids %s)", size - 1, self.pids)
        self.channel: CommandChannel | None = None
        self._closed = False
        atexit.register(self.close)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Until every rank has loaded its shard; a rank that exits first is an error."""
        keys = [f"ready/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + timeout_s
        while not self.store.check(keys):
            for rank, process in enumerate(self.processes, start=1):
                if process.poll() is not None:
                    self.close()
                    raise MolinkError(
                        f"tensor-parallel rank {rank} exited with status {process.returncode} "
                        "while loading its shard (see its log above)"
                    )
            if time.monotonic() > deadline:
                self.close()
                raise MolinkError(f"tensor-parallel ranks not ready after {timeout_s:.0f} s")
            time.sleep(_POLL_S)

    def connect(self, device: torch.device, dtype: torch.dtype, hidden_size: int) -> None:
        """Once every rank is ready: join the group and open the command channel."""
        self.wait_ready()
        group = join_group(self.store, 0, self.size, device)
        self.channel = CommandChannel(group, dtype, hidden_size)

    def _open_channel(self) -> CommandChannel:
        if self.channel is None or self._closed:
            raise MolinkError("the tensor-parallel ranks of this stage are not running")
        return self.channel

    def send_forward(self, inputs: torch.Tensor, meta: AttentionMetadata) -> None:
        self._open_channel().send_forward(inputs, meta)

    def send_logits(self, hidden: torch.Tensor) -> None:
        self._open_channel().send_logits(hidden)

    def close(self) -> None:
        """Tell the ranks to stop, wait for them, and leave the process group."""
        if self._closed:
            return
        self._closed = True
        if self.channel is not None and dist.is_initialized():
            try:
                self.channel.send_stop()
            except RuntimeError as exc:  # a rank already gone
                logger.warning("could not stop the tensor-parallel ranks: %s", exc)
        _reap(self.processes)
        if dist.is_initialized():
            dist.destroy_process_group()


def _reap(processes: Sequence[subprocess.Popen]) -> None:
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def exit_with_parent() -> None:
    """A follower never outlives rank 0: when its parent is gone, it exits."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
