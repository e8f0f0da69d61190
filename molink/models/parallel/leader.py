"""What a slice on rank 0 of a tensor-parallel stage calls before each collective pass."""

from __future__ import annotations

from typing import Protocol

import torch

from molink.models.attention_metadata import AttentionMetadata


class StepLeader(Protocol):
    """Rank 0's side (molink.parallel.launch): tells the other ranks what to run."""

    def send_forward(self, inputs: torch.Tensor, meta: AttentionMetadata) -> None: ...

    def send_logits(self, hidden: torch.Tensor) -> None: ...

    def close(self) -> None:
        """Stop the other ranks."""
        ...
