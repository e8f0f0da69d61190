"""A pre-norm layer's forward without module dispatch, where its matrices allow it.

On a CPU a one-row decode step of a small quantized model is its products plus ~25 small
ops per layer, and the Python around them counts: each module call, each quantized
layer's checks (row limit, LM-head ties, bias, dtype) and each lookup of a submodule or
parameter through ``nn.Module.__getattr__``. ``DirectPreNorm`` holds a layer's parts, asks
each matrix once per call for the bare product its ``forward`` would run for the step's
rows (``DirectProduct``), and then runs the very ops PreNormLayer, SelfAttention and
GatedMLP run, in the same order, so results are bit-identical
(tests/unit/test_models_direct_decode.py); rotary and attention stay the shared functions.
SmolLM2-135M Q4_1, one thread, a decode forward of the 30 layers: 7.1-7.4 ms -> 6.6-6.9
(ad hoc, interleaved). Any layer or step it does not cover takes the modules' path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from molink.models.attention import AttentionOptions, paged_attention
from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.mlp import GatedMLP
from molink.models.blocks.norms import RMSNorm
from molink.models.forward_context import ForwardContext

if TYPE_CHECKING:
    from molink.models.blocks.prenorm import PreNormLayer

Product = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class DirectProduct(Protocol):
    """A matrix that can hand over the bare product its forward would run."""

    def plain_product(self, rows: int) -> Product | None:
        """For float32 x of ``rows`` rows: a function equal to ``forward`` (bias-free,
        float32 out), or None where ``forward`` does more (or the weight is not loaded)."""
        ...


@dataclass(frozen=True)
class DirectPreNorm:
    """The parts of one PreNormLayer that its direct forward reads (modules doc)."""

    input_norm: RMSNorm
    post_norm: RMSNorm
    attn: SelfAttention
    mlp: GatedMLP
    qkv: DirectProduct
    o: DirectProduct
    gate_up: DirectProduct
    down: DirectProduct
    # From the attention's spec, which does not change after construction.
    k_end: int  # q's and k's channels of the fused projection
    options: AttentionOptions  # no sinks (a parameter loading may replace): fixed

    @classmethod
    def of(cls, layer: PreNormLayer) -> DirectPreNorm | None:
        """The direct form of ``layer``, or None where its structure needs the modules."""
        attn, mlp = layer.attn, layer.mlp
        norms_plain = type(layer.input_norm) is RMSNorm and type(layer.post_norm) is RMSNorm
        if not (
            norms_plain
            and layer.residual_multiplier is None
            and type(attn) is SelfAttention
            and type(mlp) is GatedMLP
            and attn.spec.qk_norm is None
            and attn.spec.rope is not None
            and not attn.spec.sinks
            and not attn.group.is_parallel
        ):
            return None
        matrices = (attn.qkv, attn.o, mlp.gate_up, mlp.down)
        if not all(isinstance(m, DirectProduct) for m in matrices):
            return None
        spec = attn.spec
        k_end = spec.q_size + spec.kv_size
        return cls(layer.input_norm, layer.post_norm, attn, mlp, *matrices, k_end, attn.options())

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor | None:
        """PreNormLayer.forward's result, or None (nothing computed) where a matrix's
        forward would do more than its bare product for these rows."""
        if x.dtype != torch.float32:
            return None
        rows = x.shape[0]
        qkv, o = self.qkv.plain_product(rows), self.o.plain_product(rows)
        gate_up, down = self.gate_up.plain_product(rows), self.down.plain_product(rows)
        if qkv is None or o is None or gate_up is None or down is None:
            return None
        spec = self.attn.spec
        norm = self.input_norm
        fused = qkv(torch.rms_norm(x, norm.shape, norm.weight, norm.eps))
        k_end = self.k_end
        v = fused[:, k_end:].view(rows, spec.num_kv_heads, -1)
        qk = fused[:, :k_end].view(rows, -1, spec.head_dim)
        q, k = ctx.rotate_qk(spec.rope, qk, spec.num_heads)
        meta = ctx.attention_meta(spec.window)
        heads = paged_attention(q, k, v, key_cache, value_cache, meta, self.options)
        x = x + o(heads)
        norm = self.post_norm
        h = gate_up(torch.rms_norm(x, norm.shape, norm.weight, norm.eps))
        mlp = self.mlp
        inner = mlp.act(h[:, : mlp.intermediate]) * h[:, mlp.intermediate :]
        return x + down(inner)
