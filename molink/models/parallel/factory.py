"""The linear factory of one tensor-parallel rank: split matrices where blocks ask for them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.models.blocks.linear import GroupedLinearLike, LinearFactory, LinearLike, TableLike
from molink.models.parallel.group import SINGLE, ParallelGroup
from molink.models.parallel.layers import (
    ColumnParallelGrouped,
    ColumnParallelLinear,
    RowParallelGrouped,
    RowParallelLinear,
    VocabParallelTable,
)
from molink.models.parallel.shard import Segment, ShardRule, segment_rule


@dataclass(frozen=True)
class ParallelLinearFactory(LinearFactory):
    """Float matrices of rank ``tp.rank`` of ``tp.size``."""

    tp: ParallelGroup = SINGLE

    @property
    def group(self) -> ParallelGroup:
        return self.tp

    def _rule(self, dim: int, segments: Sequence[Segment]) -> ShardRule:
        return segment_rule(dim, segments, self.tp.size, self.tp.rank)

    def column(
        self, in_features: int, segments: Sequence[Segment], bias: bool = False
    ) -> LinearLike:
        rule = self._rule(0, segments)
        return ColumnParallelLinear(in_features, rule, bias, self.dtype, self.device)

    def row(self, segments: Sequence[Segment], out_features: int, bias: bool = False) -> LinearLike:
        rule = self._rule(1, segments)
        return RowParallelLinear(rule, out_features, bias, self.dtype, self.device, self.tp)

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
        return VocabParallelTable(rows, cols, self.dtype, self.device, self.tp)
