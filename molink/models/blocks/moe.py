"""Mixture-of-experts feed-forward: a router picks ``top_k`` experts per token; tokens are
grouped by expert so that each chosen expert runs ONE matmul over all its tokens.

The loop is over experts that received tokens (at most ``num_experts`` iterations), never
over tokens: a prefill of thousands of tokens costs as many expert calls as a decode step.
Routing variants: softmax then top-k (Mixtral, Qwen-MoE, DeepSeek-V2), top-k then softmax
(GPT-OSS), sigmoid with a selection bias and group-limited choice (DeepSeek-V3).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import InvalidParameterError
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import GatedMLP
from molink.models.parallel.shard import Segment, split_units

ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_group", "softmax_group")


@dataclass(frozen=True)
class MoESpec:
    hidden_size: int
    intermediate_size: int  # per expert
    num_experts: int
    top_k: int
    routing: str = "softmax_topk"
    normalize: bool = True  # renormalise the chosen experts' weights to sum to 1
    scale: float = 1.0  # routed_scaling_factor
    router_bias: bool = False
    selection_bias: bool = False  # DeepSeek-V3's e_score_correction_bias
    num_groups: int = 1
    topk_groups: int = 1
    expert_bias: bool = False
    shared_intermediate: int = 0  # dense shared experts (0: none)
    shared_gate: bool = False  # Qwen2-MoE: a sigmoid gate on the shared expert
    shared_bias: bool = False  # DeepSeek-V2's mlp_bias: biases on the shared experts

    def __post_init__(self) -> None:
        assert self.routing in ROUTINGS, self.routing
        self._check_choice()

    def _check_choice(self) -> None:
        """Refuse, naming the config field, a choice of experts no token can make."""
        experts, groups = self.num_experts, self.num_groups
        if not 1 <= self.top_k <= experts:
            raise InvalidParameterError(
                "num_experts_per_tok", f"{self.top_k} must be in [1, {experts}] (the experts)"
            )
        if groups < 1 or experts % groups:
            raise InvalidParameterError(
                "n_group", f"{groups} must divide the {experts} routed experts"
            )
        if not 1 <= self.topk_groups <= groups:
            raise InvalidParameterError(
                "topk_group", f"{self.topk_groups} must be in [1, {groups}] (n_group)"
            )
        if self.routing == "sigmoid_group" and experts // groups < 2:
            # a group's score is the sum of its two best experts
            raise InvalidParameterError(
                "n_group", f"{groups} groups of {experts} experts leave fewer than 2 per group"
            )
        if self.top_k > (experts // groups) * self.topk_groups:
            raise InvalidParameterError(
                "num_experts_per_tok",
                f"{self.top_k} is more than the {self.topk_groups} chosen groups of "
                f"{experts // groups} experts hold",
            )


GluActivation = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Gated:
    """``activation(gate) * up``: SwiGLU with silu, GeGLU with gelu."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.activation = activation

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.activation(gate) * up


class MoE(nn.Module):
    """``activation`` is the config's (hidden_act): the shared experts' and, gated, the
    routed experts' unless ``act`` gives those another GLU (GPT-OSS's clamped one)."""

    def __init__(
        self,
        spec: MoESpec,
        factory: LinearFactory,
        act: GluActivation | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.silu,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.act = act if act is not None else Gated(activation)
        e, hidden, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
        # The router stays in float32 (as transformers keeps it): expert choice is discrete.
        on = factory.device
        self.router = nn.Parameter(torch.empty(e, hidden, dtype=torch.float32, device=on), False)
        self.router_bias = (
            nn.Parameter(torch.empty(e, dtype=torch.float32, device=on), False)
            if spec.router_bias
            else None
        )
        self.selection_bias = (
            nn.Parameter(torch.empty(e, dtype=torch.float32, device=on), False)
            if spec.selection_bias
            else None
        )
        # Tensor-parallel ranks split every expert's rows as a dense MLP's; the experts'
        # partial outputs are added up across ranks once per layer (``_experts``).
        rows = Segment(inter, 1, "expert intermediate rows")
        self.group = factory.group
        self.local_intermediate = split_units(inter, self.group.size, rows.what)
        self.gate_up = factory.grouped_column(e, hidden, (rows, rows), spec.expert_bias)
        self.down = factory.grouped_row(e, (rows,), hidden, spec.expert_bias)
        self.shared = (
            GatedMLP(hidden, spec.shared_intermediate, activation, factory, spec.shared_bias)
            if spec.shared_intermediate
            else None
        )
        self.shared_gate = factory.linear(hidden, 1) if spec.shared_gate else None

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, the chosen experts [T, k] and their weights [T, k] (float32)."""
        spec = self.spec
        logits = F.linear(h.float(), self.router, self.router_bias)
        if spec.routing == "topk_softmax":
            values, ids = torch.topk(logits, spec.top_k, dim=-1)
            return ids, torch.softmax(values, dim=-1)
        if spec.routing == "softmax_topk":
            scores = torch.softmax(logits, dim=-1)
            weights, ids = torch.topk(scores, spec.top_k, dim=-1)
        else:
            scores = logits.sigmoid() if spec.routing == "sigmoid_group" else logits.softmax(-1)
            ids = self._group_limited(scores)
            weights = scores.gather(1, ids)
        if spec.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * spec.scale

    def _group_limited(self, scores: torch.Tensor) -> torch.Tensor:
        """Experts from the best ``topk_groups`` groups only (DeepSeek's group routing)."""
        spec = self.spec
        choice = scores if self.selection_bias is None else scores + self.selection_bias
        grouped = choice.view(-1, spec.num_groups, spec.num_experts // spec.num_groups)
        if spec.routing == "sigmoid_group":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.max(dim=-1).values
        groups = torch.topk(group_scores, spec.topk_groups, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        keep = keep.unsqueeze(-1).expand_as(grouped).reshape(-1, spec.num_experts)
        fill = float("-inf") if spec.routing == "sigmoid_group" else 0.0
        choice = choice.masked_fill(~keep, fill)
        return torch.topk(choice, spec.top_k, dim=-1, sorted=False).indices

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self._experts(h)
        if self.shared is not None:
            shared = self.shared(h)
            if self.shared_gate is not None:
                shared = torch.sigmoid(self.shared_gate(h)) * shared
            out = out + shared
        return out

    def add_to(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return residual + self.forward(h)

    def _experts(self, h: torch.Tensor) -> torch.Tensor:
        ids, weights = self.route(h)
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.spec.num_experts).tolist()
        token_of = order // top_k  # the token each sorted assignment belongs to
        weight_of = weights.reshape(-1)[order].to(h.dtype).unsqueeze(1)
        out = torch.zeros_like(h)
        inter = self.local_intermediate
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            gate_up = self.gate_up.forward_expert(expert, h[rows])
            act = self.act(gate_up[:, :inter], gate_up[:, inter:])
            y = self.down.forward_expert(expert, act) * weight_of[start : start + count]
            out.index_add_(0, rows, y)
            start += count
        return self.group.all_reduce(out)
