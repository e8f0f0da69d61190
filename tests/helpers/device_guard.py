"""A dispatch mode that records every tensor an operation produces off a given device.

Running a stage on ``meta`` under it shows any allocation that does not follow
``--device`` (a stray ``.cpu()``, a ``torch.tensor`` without ``device=``): on a GPU those
would be host tensors, silent copies or device-mismatch errors. Zero-dimensional host
tensors are scalars that every device accepts, so they are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class OffDeviceRecorder(TorchDispatchMode):
    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.strays: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if (
                isinstance(tensor, torch.Tensor)
                and tensor.device.type != self.device.type
                and tensor.dim() > 0
            ):
                self.strays.append(f"{func} -> {tuple(tensor.shape)} on {tensor.device}")
        return out


def tensors_off_device(module: torch.nn.Module, device: str) -> list[str]:
    """Names of the module's parameters and buffers that are not on ``device``."""
    want = torch.device(device).type
    named = [*module.named_parameters(), *module.named_buffers()]
    return [f"{name} on {t.device}" for name, t in named if t.device.type != want]
