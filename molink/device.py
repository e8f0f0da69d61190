"""Which device a stage computes on: ``--device auto|cpu|cuda|cuda:N`` (as vLLM's flag).

``auto`` picks the first CUDA device when torch sees one, else the CPU. An explicit CUDA
device that this machine does not have fails at start, naming it, instead of at the first
request. ``meta`` is accepted for tests: a stage built on it allocates nothing, so any
tensor that lands elsewhere shows a stray host allocation.
"""

from __future__ import annotations

import re

import torch

from molink.errors import InvalidParameterError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
_PATTERN = re.compile(r"^(auto|cpu|meta|cuda)(?::(\d+))?$")


def check_device_text(text: str) -> None:
    """Syntax only (no CUDA probing): a named error for anything but the choices."""
    match = _PATTERN.match(text.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise InvalidParameterError("device", f"{text!r} is not one of {', '.join(DEVICE_CHOICES)}")


def resolve_device(text: str) -> torch.device:
    """The torch device for a ``--device`` value; a CUDA device this machine lacks is refused."""
    check_device_text(text)
    name = text.strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)
        _check_cuda(device, text)
    return device


def _check_cuda(device: torch.device, text: str) -> None:
    if not torch.cuda.is_available():
        raise InvalidParameterError(
            "device",
            f"{text!r}: torch sees no CUDA device on this machine (torch "
            f"{torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
            "use --device cpu or auto",
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise InvalidParameterError(
            "device",
            f"{text!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}",
        )


def device_kind(device: torch.device) -> str:
    """What a node advertises: ``cpu``, or the GPU's name (e.g. ``NVIDIA H100 80GB HBM3``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
