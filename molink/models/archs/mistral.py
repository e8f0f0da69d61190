"""Mistral: Llama without projection biases, with a sliding window on every layer."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.architecture import configured_layer_types
from molink.models.archs.llama import Llama


class Mistral(Llama):
    model_type = "mistral"

    def qkv_bias(self, config: ModelConfig) -> bool:
        return False  # whatever the config says, Mistral's projections have no bias

    def o_bias(self, config: ModelConfig) -> bool:
        return False

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def layer_types(self, config: ModelConfig) -> list[str]:
        # Every layer slides; transformers loads a Mistral config that lists layer_types
        # as Ministral, which follows them.
        return configured_layer_types(config, lambda i: True)


ARCHITECTURE = Mistral()
