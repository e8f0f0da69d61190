"""Quantized matrices split across the ranks of a tensor-parallel stage.

The same scheme as molink.models.parallel.layers (Megatron-LM's, as vLLM runs it), with
each rank's share kept as packed integers: column-parallel matrices hold their output
rows, row-parallel ones the matching input columns (split at quantization-group
boundaries: molink.weights.gguf_slices refuses a split that would cut a group), and the
embedding / LM head a band of vocabulary rows. Each rank reads and packs only its share.
Mixture-of-experts matrices stay float, as they do on one rank (QuantLinearFactory), and
are split as float ones are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import InvalidParameterError
from molink.models.blocks.linear import GroupedLinearLike, LinearLike, TableLike
from molink.models.parallel.group import SINGLE, ParallelGroup
from molink.models.parallel.layers import ColumnParallelGrouped, RowParallelGrouped
from molink.models.parallel.shard import Segment, ShardRule, segment_rule, vocab_rule
from molink.quant.factory import QuantLinearFactory
from molink.quant.groups import GroupInts
from molink.quant.linear import QuantLinear


class QuantColumnParallel(QuantLinear):
    """This rank's output rows of a (possibly fused) quantized matrix; output stays local."""

    def __init__(
        self, in_features: int, rule: ShardRule, bias: bool, factory: QuantLinearFactory
    ) -> None:
        super().__init__(
            in_features, rule.local_size, bias, factory.bits, factory.float_kernel,
            factory.device,
        )  # fmt: skip
        self.rule = rule

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr in ("weight", "bias") else None


class QuantRowParallel(QuantLinear):
    """This rank's input columns; the output is the all-reduced sum plus the bias."""

    def __init__(
        self,
        rule: ShardRule,
        out_features: int,
        bias: bool,
        factory: QuantLinearFactory,
        group: ParallelGroup,
    ) -> None:
        super().__init__(
            rule.local_size, out_features, bias, factory.bits, factory.batch_kernel,
            factory.device,
        )  # fmt: skip
        self.rule = rule
        self.group = group

    def plain_product(self, rows: int) -> None:
        """Never: this rank's product is summed with the other ranks' (``forward``)."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.product(x).contiguous())
        if self.bias is not None:
            y += self.bias  # once, after the sum
        return y.to(x.dtype)

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None


class QuantVocabTable(nn.Module):
    """A ``TableLike``: this rank's band of vocabulary rows, quantized."""

    def __init__(
        self, rows: int, cols: int, factory: QuantLinearFactory, group: ParallelGroup
    ) -> None:
        super().__init__()
        self.rule = vocab_rule(rows, group.size, group.rank)
        ((self.start, self.stop),) = self.rule.ranges
        if self.stop <= self.start:
            raise InvalidParameterError(
                "tensor_parallel_size",
                f"{group.size} ranks leave rank {group.rank} none of the {rows} vocabulary rows",
            )
        self.rows_per_rank = -(-rows // group.size)
        self.in_features = cols
        self.out_features = rows
        self.group = group
        self.local = QuantLinear(
            cols, self.stop - self.start, False, factory.bits, factory.float_kernel,
            factory.device, table=True,
        )  # fmt: skip

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None

    def load_weight(self, weight: torch.Tensor | GroupInts, pack: bool) -> None:
        self.local.load_weight(weight, pack)

    def prepack(self, enable: bool) -> None:
        """Nothing to do: the band is packed as it loads."""

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.stop - self.start)
        rows = self.local.embedding(local.masked_fill(outside, 0))
        rows = rows.masked_fill(outside.unsqueeze(1), 0.0)
        return self.group.all_reduce(rows.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary [T, rows], on every rank."""
        local = self.local(x)
        # Bands are gathered side by side, so each must be rows_per_rank wide.
        local = F.pad(local, (0, self.rows_per_rank - local.shape[1]))
        return self.group.all_gather_last(local)[:, : self.out_features]

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self.forward(x)


@dataclass(frozen=True)
class QuantParallelFactory(QuantLinearFactory):
    """Quantized matrices of rank ``tp.rank`` of ``tp.size``."""

    tp: ParallelGroup = SINGLE

    @property
    def group(self) -> ParallelGroup:
        return self.tp

    def _rule(self, dim: int, segments: Sequence[Segment]) -> ShardRule:
        return segment_rule(dim, segments, self.tp.size, self.tp.rank)

    def column(
        self, in_features: int, segments: Sequence[Segment], bias: bool = False
    ) -> LinearLike:
        return QuantColumnParallel(in_features, self._rule(0, segments), bias, self)

    def row(self, segments: Sequence[Segment], out_features: int, bias: bool = False) -> LinearLike:
        return QuantRowParallel(self._rule(1, segments), out_features, bias, self, self.tp)

    def grouped_column(
        self, num_experts: int, in_features: int, segments: Sequence[Segment], bias: bool = False
    ) -> GroupedLinearLike:
        rule = self._rule(0, segments)
        return ColumnParallelGrouped(num_experts, in_features, rule, bias, self.dtype, self.device)

    def grouped_row(
        self, num_experts: int, segments: Sequence[Segment], out_features: int, bias: bool = False
    ) -> GroupedLinearLike:
        rule = self._rule(1, segments)
        return RowParallelGrouped(
            num_experts, rule, out_features, bias, self.dtype, self.device, self.tp
        )

    def vocab_table(self, rows: int, cols: int) -> TableLike | None:
        return QuantVocabTable(rows, cols, self, self.tp)  # type: ignore[return-value]


def parallel_quant_factory(
    factory: QuantLinearFactory, group: ParallelGroup
) -> QuantParallelFactory:
    return QuantParallelFactory(
        factory.dtype, factory.device, factory.bits, factory.batch_kernel, factory.fp8, group
    )
