"""Matrices split across the ranks of a stage (Megatron-LM's scheme, as vLLM runs it).

Column-parallel: each rank holds some output rows (its heads of q/k/v, its rows of
gate/up) and its output stays local. Row-parallel: each rank holds the matching input
columns (o, down), multiplies its share and the ranks' partial sums are added with one
all-reduce; a bias is added once, after the sum. The vocabulary-parallel table holds a
band of the vocabulary's rows: an embedding lookup outside the band is zero and the
all-reduce fills it in; the LM head's logits are gathered from every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import WeightLoadError
from molink.models.blocks.linear import DenseGroupedLinear, DenseLinear, matrix_param
from molink.models.cpu_linear import linear, prepack
from molink.models.parallel.group import ParallelGroup
from molink.models.parallel.shard import ShardRule, vocab_rule


class ColumnParallelLinear(DenseLinear):
    """This rank's output rows of a (possibly fused) matrix; the output stays local."""

    def __init__(
        self, in_features: int, rule: ShardRule, bias: bool, dtype: torch.dtype, device
    ) -> None:
        super().__init__(in_features, rule.local_size, bias, dtype, device)
        self.rule = rule

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr in ("weight", "bias") else None


class RowParallelLinear(DenseLinear):
    """This rank's input columns; the output is the all-reduced sum plus the bias."""

    def __init__(
        self,
        rule: ShardRule,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device,
        group: ParallelGroup,
    ) -> None:
        super().__init__(rule.local_size, out_features, False, dtype, device)
        self.rule = rule
        self.group = group
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(linear(x, self.weight, self.packed, None))
        return y if self.bias is None else y + self.bias

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self.forward(x)

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None


class ColumnParallelGrouped(DenseGroupedLinear):
    """Every expert's output rows of this rank (each expert split as a dense MLP is)."""

    def __init__(
        self, num_experts: int, in_features: int, rule: ShardRule, bias: bool, dtype, device
    ) -> None:
        super().__init__(num_experts, in_features, rule.local_size, bias, dtype, device)
        self.rule = rule

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr in ("weight", "bias") else None


class RowParallelGrouped(DenseGroupedLinear):
    """Every expert's input columns of this rank. Outputs are partial sums: the mixture
    adds its experts' outputs first and all-reduces once; rank 0 alone adds the bias."""

    def __init__(
        self,
        num_experts: int,
        rule: ShardRule,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device,
        group: ParallelGroup,
    ) -> None:
        super().__init__(num_experts, rule.local_size, out_features, bias, dtype, device)
        self.rule = rule
        self.group = group

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias[expert] if self.bias is not None and self.group.is_leader else None
        return F.linear(x, self.weight[expert], bias)

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None


class VocabParallelTable(nn.Module):
    """A ``TableLike``: this rank's band of vocabulary rows (zero-padded to equal bands)."""

    def __init__(
        self, rows: int, cols: int, dtype: torch.dtype, device, group: ParallelGroup
    ) -> None:
        super().__init__()
        self.rule = vocab_rule(rows, group.size, group.rank)
        ((self.start, self.stop),) = self.rule.ranges
        self.rows_per_rank = -(-rows // group.size)
        self.in_features = cols
        self.out_features = rows
        self.group = group
        self.weight = matrix_param(self.rows_per_rank, cols, dtype, device)
        with torch.no_grad():
            self.weight.zero_()
        self.packed: torch.Tensor | None = None

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        rows = rows.masked_fill(outside.unsqueeze(1), 0.0)
        return self.group.all_reduce(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary [T, rows], on every rank."""
        local = linear(x, self.weight, self.packed, None)
        return self.group.all_gather_last(local)[:, : self.out_features]

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self.forward(x)

    def load_weight(self, weight: torch.Tensor, pack: bool) -> None:
        expected = (self.stop - self.start, self.in_features)
        if tuple(weight.shape) != expected:
            raise WeightLoadError(
                f"vocabulary band has shape {tuple(weight.shape)}, expected {expected}"
            )
        with torch.no_grad():
            self.weight[: expected[0]].copy_(weight)
        self.prepack(pack)

    def prepack(self, enable: bool) -> None:
        self.packed = prepack(self.weight) if enable else None
