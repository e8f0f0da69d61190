"""Which Hugging Face architectures MoLink implements, and how a config.json names them."""

from __future__ import annotations

from collections.abc import Sequence

from molink.errors import UnsupportedArchitectureError

# Every entry runs on the same decoder (molink.models.decoder); they differ only in flags
# that ModelConfig carries (q/k/v bias, per-head q/k norm, sliding window).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


def resolve_architecture(archs: Sequence[str] | None) -> str:
    """Pick the first architecture in ``archs`` that MoLink implements.

    config.json lists ``architectures``; a checkpoint usually names exactly one.
    """
    for arch in archs or ():
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise UnsupportedArchitectureError(
        list(archs) if archs is not None else None, list(SUPPORTED_ARCHITECTURES)
    )
