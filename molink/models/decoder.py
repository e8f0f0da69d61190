"""A contiguous slice ``[start, end)`` of a decoder, for any registered architecture.

The first slice embeds token ids; the last applies the final norm and holds the LM head.
Hidden states cross the seams between slices as [T, hidden] tensors. What happens inside
a layer is the architecture's (molink/models/archs); this file owns only the slicing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from molink.config import LayerRange, ModelConfig
from molink.errors import ContextLengthExceededError, InvalidParameterError
from molink.models.attention_metadata import AttentionMetadata
from molink.models.blocks.linear import LinearFactory, LinearLike, TableLike, matrix_param
from molink.models.cpu_linear import linear, prepack
from molink.models.forward_context import ForwardContext
from molink.models.kv_cache import KVCache
from molink.models.loading import checkpoint_tensor_names, load_slice_tensors
from molink.models.parallel.leader import StepLeader
from molink.models.registry import architecture_for
from molink.models.rope import RotaryTables
from molink.models.rope_length import model_max_context

logger = logging.getLogger(__name__)

# A KV cache may be stored in these whatever the activations' dtype (--kv-cache-dtype):
# attention writes into it and reads from it with a cast (float8: fp8 on a GPU).
KV_STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float8_e4m3fn)
# Above this much matrix memory a slice does not keep a second, oneDNN-packed copy.
PREPACK_MAX_BYTES = 4 << 30

__all__ = ["DecoderSlice", "checkpoint_tensor_names"]


class DecoderSlice(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer_range: LayerRange,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        linear_factory: LinearFactory | None = None,
    ) -> None:
        super().__init__()
        layer_range.validate(config.num_layers)
        arch = architecture_for(config)
        arch.check_config(config)
        device = torch.device(device)
        factory = linear_factory or LinearFactory(dtype, device)
        self.architecture = arch
        self.config = config
        self.layer_range = layer_range
        self.dtype = dtype
        self._device = device
        self.is_first = layer_range.is_first()
        self.is_last = layer_range.is_last(config.num_layers)
        hidden = config.hidden_size
        # A float matrix, or the factory's table (a quantized one keeps its packed form).
        self.embed: nn.Parameter | TableLike | None = None
        if self.is_first:
            self.embed = factory.vocab_table(config.vocab_size, hidden) or matrix_param(
                config.vocab_size, hidden, dtype, device
            )
        self.embed_scale = arch.embedding_scale(config)
        # A tensor made once: a captured CUDA graph cannot copy a new one from the host.
        scale = self.embed_scale
        self.register_buffer(
            "_embed_scale",
            None if scale is None else torch.tensor(scale, dtype=dtype, device=device),
            persistent=False,
        )
        self.layers = nn.ModuleList(
            arch.build_layer(config, index, factory)
            for index in range(layer_range.start, layer_range.end)
        )
        self.final_norm: nn.Module | None = None
        self.lm_head: nn.Parameter | TableLike | None = None
        if self.is_last:
            self.final_norm = arch.build_final_norm(config, factory)
            if config.tie_word_embeddings and self.embed is not None:
                self.lm_head = self.embed  # one tensor serves both ends
            else:
                self.lm_head = factory.vocab_table(config.vocab_size, hidden) or matrix_param(
                    config.vocab_size, hidden, dtype, device
                )
        self.logits_scale = arch.logits_scale(config)
        self.logits_softcap = arch.logits_softcap(config)
        self.rotaries = {
            key: RotaryTables(spec, dtype, device) for key, spec in arch.rope_specs(config).items()
        }
        self.lm_head_packed: torch.Tensor | None = None
        self.max_context = model_max_context(config)
        self.group = factory.group
        # Rank 0 of a tensor-parallel stage: tells the other ranks each forward it runs.
        self.leader: StepLeader | None = None

    @property
    def num_local_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        return self._device

    def forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        """Run this slice's layers over one flattened batch.

        ``inputs`` are token ids [T] on the first slice, hidden states [T, hidden] after it.
        Returns [T, hidden]; on the last slice already through the final norm.
        """
        with torch.inference_mode():
            if self.leader is not None:
                self.leader.send_forward(inputs, meta)
            return self._forward(inputs, meta, kv_cache)

    def _forward(
        self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: KVCache
    ) -> torch.Tensor:
        kv_ok = kv_cache.dtype == self.dtype or kv_cache.dtype in KV_STORAGE_DTYPES
        if kv_cache.num_layers != len(self.layers) or not kv_ok:
            raise InvalidParameterError(
                "kv_cache",
                f"holds {kv_cache.num_layers} layers of {kv_cache.dtype}; this slice runs "
                f"{len(self.layers)} layers in {self.dtype}",
            )
        if self.embed is not None:
            # A float matrix or a TableLike; told apart by the Tensor check, since an
            # isinstance against a runtime protocol costs ~10 us on every forward.
            if isinstance(self.embed, torch.Tensor):
                x = F.embedding(inputs, self.embed)
            else:
                x = self.embed.embedding(inputs).to(self.dtype)
            if self.embed_scale is not None:
                # In the model's dtype, as transformers rounds the scale (Gemma).
                x = x * self._embed_scale
        else:
            x = inputs.to(self.dtype)
        if meta.max_context_len > self.max_context:
            raise ContextLengthExceededError(meta.max_context_len, self.max_context, "sequence")
        if meta.positions.device != x.device:
            # Built on another device (the stage runner's default is CPU): rebuild once here
            # rather than copy index tensors in every layer.
            meta = AttentionMetadata.build(
                meta.chunks, meta.block_size, device=x.device, sliding_window=meta.sliding_window
            )
        ctx = ForwardContext(meta, self.rotaries)
        keys, values = kv_cache.keys, kv_cache.values
        for index, layer in enumerate(self.layers):
            # forward() directly: nn.Module.__call__'s hook handling costs more than the
            # small ops of a decode step, and no hooks are registered on these layers.
            x = layer.forward(x, ctx, keys[index], values[index])
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, vocab] in float32 for final hidden states [N, hidden] (last slice only)."""
        if self.lm_head is None:
            raise InvalidParameterError(
                "compute_logits", "only the slice that ends at the last layer has the LM head"
            )
        with torch.inference_mode():
            if self.leader is not None:
                self.leader.send_logits(hidden)
            if isinstance(self.lm_head, torch.Tensor):  # else a TableLike (see _forward)
                logits = linear(hidden.to(self.dtype), self.lm_head, self.lm_head_packed, None)
            else:
                logits = self.lm_head(hidden.to(self.dtype))
            logits = logits.float()
            if self.logits_scale is not None:
                logits = logits * self.logits_scale
            if self.logits_softcap is not None:
                logits = torch.tanh(logits / self.logits_softcap) * self.logits_softcap
            return logits

    # --- weights -----------------------------------------------------------------------

    def checkpoint_tensor_names(self) -> list[str]:
        """Hugging Face tensor names this slice reads, and nothing more."""
        return checkpoint_tensor_names(self.config, self.layer_range)

    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fill this slice from Hugging Face-named tensors (fusing q/k/v, gate/up, experts).

        Small float32 slices on CPU also keep oneDNN-packed matrices (see ``prepack``).
        """
        load_slice_tensors(self, tensors, pack=self._prepack_allowed())

    def _linears(self) -> list[LinearLike]:
        return [m for m in self.modules() if isinstance(m, LinearLike)]

    def _prepack_allowed(self) -> bool:
        if self._device.type != "cpu":
            return False  # oneDNN's packed layout exists only for CPU matrices
        size = sum(p.numel() * p.element_size() for p in self.parameters() if p.dim() >= 2)
        return size <= PREPACK_MAX_BYTES

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to()/.cuda()/.half() change the weights; the packed copies would be stale (and
        # are CPU-only), so they go. Build a slice with the right device and dtype instead.
        self.lm_head_packed = None
        return super()._apply(fn, recurse)

    def prepack(self, enable: bool = True) -> None:
        """Keep oneDNN-packed copies of the matrices, for decode batches of 2-32 rows on CPU.

        Loading does this already when the slice runs in float32 on CPU and its matrices
        take at most ``PREPACK_MAX_BYTES`` (the copies double that memory);
        ``prepack(False)`` drops them.
        """
        enable = enable and self._prepack_allowed()
        for module in self._linears():
            module.prepack(enable)
        head = self.lm_head if isinstance(self.lm_head, torch.Tensor) else None
        self.lm_head_packed = prepack(head) if enable and head is not None else None
