"""What a node has to offer, as announced in its record: its device and that device's memory.

A CUDA device reports its own total and free bytes (``torch.cuda.mem_get_info``); a CPU
stage reports the machine's memory from /proc/meminfo (MemTotal, MemAvailable), with
sysconf where there is no /proc, cut to its control group's limit where one is set (a
container's: molink.stage.cgroup_memory).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from molink.errors import InvalidParameterError
from molink.stage.cgroup_memory import cgroup_memory


@dataclass(frozen=True)
class DeviceMemory:
    total_bytes: int
    free_bytes: int


def device_of(module: torch.nn.Module) -> str:
    """ "cpu", "cuda:0", ...: where the module's weights live ("cpu" for one without any)."""
    for tensor in module.parameters():
        return str(tensor.device)
    for tensor in module.buffers():
        return str(tensor.device)
    return "cpu"


def memory_of(device: str) -> DeviceMemory:
    kind = torch.device(device)
    if kind.type == "cuda":
        free, total = torch.cuda.mem_get_info(kind)
        return DeviceMemory(int(total), int(free))
    return host_memory()


def host_memory() -> DeviceMemory:
    fields = _meminfo()
    page = os.sysconf("SC_PAGE_SIZE")
    total = fields.get("MemTotal", os.sysconf("SC_PHYS_PAGES") * page)
    free = fields.get("MemAvailable", os.sysconf("SC_AVPHYS_PAGES") * page)
    limit = cgroup_memory()
    if limit is not None:
        total, free = min(total, limit.limit_bytes), min(free, limit.available_bytes)
    return DeviceMemory(total, free)


def check_host_room(kv_bytes: int) -> None:
    """A CPU KV cache becomes resident as its blocks fill (molink.models.kv_cache), so one
    larger than the memory available now would be found out mid-serving, by the kernel's
    out-of-memory killer: it is refused at start instead, naming the setting."""
    free = host_memory().free_bytes
    if kv_bytes > free:
        raise InvalidParameterError(
            "kv_cache_memory",
            f"{kv_bytes / 2**30:.2f} GiB of KV cache do not fit in the {free / 2**30:.2f} GiB "
            "of memory this machine (or its container's memory limit) has available",
        )


def _meminfo() -> dict[str, int]:
    """The kB figures of /proc/meminfo, in bytes; empty where the file is absent."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                name, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    fields[name] = int(parts[0]) * 1024
    except OSError:
        return {}
    return fields
