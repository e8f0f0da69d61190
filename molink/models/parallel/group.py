"""The ranks of one stage and the collectives its layers need.

``torch.distributed`` runs the collectives: NCCL between CUDA devices, gloo between CPU
processes (so CI tests tensor parallelism with two CPU processes). It is the library the
PyTorch serving engines (vLLM, SGLang) build on; the rendezvous is a TCP store on the
loopback address, as a stage's ranks always share one machine (molink.parallel.launch).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from molink.errors import InvalidParameterError

# A follower waits this long for rank 0's next command before the collective gives up; a
# stage may idle for hours between requests.
IDLE_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class ParallelGroup:
    """Rank ``rank`` of ``size``; ``device`` is where collectives' tensors must live."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place; the tensor itself when there is one rank."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` [..., n] side by side: [..., size * n]."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts, dim=-1)

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` into every rank's (same shape and dtype), in place."""
        if self.size > 1:
            dist.broadcast(tensor, src=0)
        return tensor


SINGLE = ParallelGroup()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: CUDA ranks take consecutive devices from ``device``'s index."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank)


def rank_devices(device: torch.device, size: int) -> list[torch.device]:
    """Every rank's device; a CUDA device past the machine's last one is refused, naming
    the devices the ranks need (a rank would otherwise fail as it loads, or placement
    as it reads the device's memory, with torch's "invalid device ordinal")."""
    devices = [rank_device(device, rank) for rank in range(size)]
    if device.type == "cuda" and size > 1:  # one rank's device was checked at start
        count = torch.cuda.device_count()
        last = devices[-1].index
        if last is not None and last >= count:
            raise InvalidParameterError(
                "tensor_parallel_size",
                f"{size} ranks from {devices[0]} need cuda:{devices[0].index} to cuda:{last}; "
                f"this machine has {count} CUDA device(s)",
            )
    return devices
