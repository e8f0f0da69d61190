"""What a node is, as plain data: its model, its layers, its capacity, its address.

Kept apart from the transport so that discovery can announce the same records later.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from molink.config import LayerRange, ModelConfig
from molink.transport import PROTOCOL_VERSION

# The fields that decide whether two nodes hold pieces of the same decoder.
_FINGERPRINT_FIELDS = (
    "architecture",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_theta",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "rope_scaling",
    "sliding_window",
)


def model_fingerprint(config: ModelConfig) -> str:
    """A short stable hash of the decoder's shape.

    It tells apart models that cannot be chained (different sizes, vocab, architecture);
    it cannot tell apart two checkpoints of one shape, which is what the served name is for.
    """
    fields = {name: getattr(config, name) for name in _FINGERPRINT_FIELDS}
    canonical = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    served_name: str
    fingerprint: str
    num_layers: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def from_model_config(cls, served_name: str, config: ModelConfig) -> ModelIdentity:
        return cls(
            served_name=served_name,
            fingerprint=model_fingerprint(config),
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            vocab_size=config.vocab_size,
        )


@dataclass(frozen=True)
class NodeInfo:
    """One node's announcement: which layers it serves and how to reach it."""

    node_id: str
    model: ModelIdentity
    layers: LayerRange
    address: str = ""  # advertised host:port; may differ from the bind address
    num_kv_blocks: int = 0
    block_size: int = 0
    dtype: str = "float32"
    wire_dtype: str = "float16"
    protocol_version: int = PROTOCOL_VERSION
    # The node's identity key (DER SubjectPublicKeyInfo; molink.security.identity derives
    # node_id from it); empty for an open node, which is named by its address.
    public_key: bytes = b""
    free_kv_blocks: int = 0
    throughput_tokens_per_s: float = 0.0  # measured: tokens per second of compute, its span
    dht_address: str = ""  # where others may bootstrap the DHT from; "" without one
    device: str = "cpu"  # where its layers run: "cpu", "cuda:0", ...
    memory_total_bytes: int = 0  # that device's memory (0: not reported)
    memory_free_bytes: int = 0
    # Seconds one decoder layer takes for a probe step on its device, measured at start
    # (molink.stage.speed; 0: not measured): what placement compares nodes' speeds by.
    layer_step_s: float = 0.0

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.end == self.model.num_layers

    def with_address(self, address: str) -> NodeInfo:
        return replace(self, address=address)

    def describe(self) -> str:
        return f"{self.node_id} (layers {format_range(self.layers)}) at {self.address}"


def format_range(layers: LayerRange) -> str:
    return f"[{layers.start}, {layers.end})"
