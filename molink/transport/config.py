"""Limits and timeouts of the wire and the pipeline runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

from molink.errors import InvalidParameterError
from molink.security.credentials import SwarmCredentials

MIB = 1024 * 1024
WIRE_DTYPES = ("float32", "float16", "bfloat16", "int8")


@dataclass(frozen=True)
class TransportConfig:
    """Everything a node needs to know about message limits and deadlines.

    The count limits bound what a peer may make a stage allocate; they are generous for a
    single deployment and exist to turn a garbage message into a clear ProtocolError.
    """

    max_message_bytes: int = 256 * MIB  # gRPC send/receive limit, server and channel
    max_seqs_per_step: int = 4096
    max_tokens_per_step: int = 1 << 20
    max_tokens_per_sequence: int = 1 << 20  # token_ids of one NewSequence
    max_blocks_per_step: int = 1 << 20
    max_stop_strings: int = 64
    max_queued_steps: int = 64  # steps received but not yet computed, per head per node
    step_timeout_s: float = 120.0  # head: a step whose result has not come back fails
    upstream_stall_s: float = 30.0  # stage: no input for this long with active sequences
    health_interval_s: float = 1.0  # head: how often every stage is checked
    health_timeout_s: float = 2.0
    health_failures_to_down: int = 2  # consecutive failed checks before a stage is dropped
    # head: a step is overdue after max(floor, factor * its measured round trip); then its
    # route's nodes are probed (molink/pipeline/deadlines.py)
    deadline_floor_s: float = 2.0
    deadline_factor: float = 4.0
    # stage: a head's sequences are freed when the head has sent nothing (steps, releases,
    # health checks) for this long; keep it well above the head's health_interval_s
    lease_s: float = 10.0
    rpc_timeout_s: float = 5.0  # unary calls (Describe, Join, GetPipeline, ...)
    join_timeout_s: float = 60.0  # a stage keeps retrying an unreachable initial peer
    server_workers: int = 32  # streams hold a worker each for their whole life
    # Per-peer bounds (molink.security.limits): streams one member holds on a node at once,
    # joins (a burst, then one per interval, per member and for the node), and sequences
    # one head may hold on a stage. Any member can mint identities, so each comes with a
    # node-wide bound; streams stay below server_workers so unary calls (health checks,
    # releases) always find a worker.
    max_streams_per_peer: int = 8
    max_streams_per_node: int = 24
    join_burst: int = 5
    join_interval_s: float = 2.0
    node_join_burst: int = 30
    max_sequences_per_head: int = 4096
    max_sequences_per_node: int = 16384
    max_queued_steps_per_node: int = 256  # all heads' steps received, not yet computed
    max_pipeline_nodes: int = 1024  # nodes a head's pipeline holds, the head among them
    # Mutual TLS with the swarm's authority on every server and channel; None: open mode
    # (plaintext, any caller), for trusted networks and development only.
    security: SwarmCredentials | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for name in (
            "max_message_bytes",
            "max_seqs_per_step",
            "max_tokens_per_step",
            "max_tokens_per_sequence",
            "max_blocks_per_step",
            "max_queued_steps",
            "health_failures_to_down",
            "server_workers",
            "max_streams_per_peer",
            "max_streams_per_node",
            "join_burst",
            "node_join_burst",
            "max_sequences_per_head",
            "max_sequences_per_node",
            "max_queued_steps_per_node",
            "max_pipeline_nodes",
        ):
            if getattr(self, name) < 1:
                raise InvalidParameterError(name, "must be >= 1")
        if self.max_streams_per_node >= self.server_workers:
            raise InvalidParameterError(
                "max_streams_per_node",
                f"must be below server_workers ({self.server_workers}): each stream holds "
                "a worker for its whole life, and unary calls need one too",
            )
        if self.max_message_bytes >= 2**31:
            # gRPC keeps message sizes in a signed 32-bit int.
            raise InvalidParameterError("max_message_bytes", "must be < 2 GiB")
        for name in (
            "step_timeout_s",
            "upstream_stall_s",
            "health_interval_s",
            "health_timeout_s",
            "rpc_timeout_s",
            "join_timeout_s",
            "join_interval_s",
            "deadline_floor_s",
            "deadline_factor",
            "lease_s",
        ):
            if not getattr(self, name) > 0:
                raise InvalidParameterError(name, "must be > 0")
