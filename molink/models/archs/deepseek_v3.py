"""DeepSeek-V3: V2's latent attention; sigmoid routing with a selection bias, choice limited
to the best groups of experts, renormalised weights."""

from __future__ import annotations

from dataclasses import replace

from molink.config import ModelConfig
from molink.models.architecture import Binding
from molink.models.archs.deepseek_v2 import DeepseekV2
from molink.models.blocks.moe import MoESpec


class DeepseekV3(DeepseekV2):
    model_type = "deepseek_v3"
    routing_methods = ()  # sigmoid scores, a selection bias and group limits, always

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False  # V3's MLPs have no biases whatever the config says

    def interleaved_rope_for(self, config: ModelConfig) -> bool:
        return bool(config.raw.get("rope_interleave", True))

    def moe_spec(self, config: ModelConfig) -> MoESpec:
        raw = config.raw
        return replace(
            super().moe_spec(config),
            routing="sigmoid_group",
            normalize=bool(raw.get("norm_topk_prob", True)),
            selection_bias=True,
        )

    def router_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        gate = self.layer_prefix(index) + "mlp.gate."
        return [
            Binding("mlp.router", (gate + "weight",)),
            Binding("mlp.selection_bias", (gate + "e_score_correction_bias",)),
        ]


ARCHITECTURE = DeepseekV3()
