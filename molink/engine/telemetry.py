"""What the head measures about its pipeline, for transmission scheduling and for
choosing how many micro-batches to keep in flight. Everything here is estimated online
from the transfers and steps themselves, never configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class LinkEstimate:
    """One hop ("a->b"): how long a message of ``n`` bytes takes is about
    ``rtt_s / 2 + n / bandwidth_bytes_per_s``."""

    hop: str
    bandwidth_bytes_per_s: float  # math.inf until a large enough transfer was seen
    rtt_s: float
    samples: int


@dataclass(frozen=True)
class StageTiming:
    node_id: str
    compute_s_per_step: float  # smoothed compute time of one micro-batch step
    compute_s_per_token: float  # smoothed marginal compute time per scheduled token
    samples: int
    # Smoothed compute time of the steps that carried no prefill chunk; 0 until one came.
    compute_s_per_decode_step: float = 0.0


class PipelineTelemetry(Protocol):
    def link_estimates(self) -> list[LinkEstimate]:
        """Every hop in pipeline order, including the last stage -> head hop."""

    def stage_timings(self) -> list[StageTiming]:
        """Every stage (the head included) in pipeline order."""

    def hidden_bytes_per_token(self) -> int:
        """Bytes one token's activations take on the wire (hidden size x wire dtype)."""
