"""Dense feed-forward blocks: gated (SwiGLU/GeGLU, gate and up as one matrix) and plain."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import InvalidParameterError
from molink.models.blocks.linear import LinearFactory
from molink.models.parallel.shard import Segment, split_units

Activation = Callable[[torch.Tensor], torch.Tensor]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Activation] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
}


def activation(name: str, field: str = "hidden_act") -> Activation:
    """The function for a config's activation name; an unknown name is refused."""
    fn = _ACTIVATIONS.get(name)
    if fn is None:
        raise InvalidParameterError(
            field, f"{name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}"
        )
    return fn


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one matrix."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        act: Activation,
        factory: LinearFactory,
        bias: bool = False,
    ) -> None:
        super().__init__()
        rows = Segment(intermediate, 1, "MLP intermediate rows")
        # Each tensor-parallel rank holds its share of gate's and up's rows.
        self.intermediate = split_units(intermediate, factory.group.size, rows.what)
        self.act = act
        self.gate_up = factory.column(hidden, (rows, rows), bias)
        self.down = factory.row((rows,), hidden, bias)

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up.forward(h)  # no hooks on blocks (see prenorm.py)
        return self.act(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(self.inner(h))

    def add_to(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.down.add_to(residual, self.inner(h))


class PlainMLP(nn.Module):
    """``down(act(up(x)))`` (StarCoder 2's ``c_fc``/``c_proj``)."""

    def __init__(
        self, hidden: int, intermediate: int, act: Activation, factory: LinearFactory, bias: bool
    ) -> None:
        super().__init__()
        self.act = act
        rows = Segment(intermediate, 1, "MLP intermediate rows")
        self.up = factory.column(hidden, (rows,), bias)
        self.down = factory.row((rows,), hidden, bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down.forward(self.act(self.up.forward(h)))

    def add_to(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.down.add_to(residual, self.act(self.up.forward(h)))
