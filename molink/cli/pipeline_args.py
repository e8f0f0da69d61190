"""The MoLink pipeline flags (--molink-*): what they mean, their defaults, and their checks.

``EngineArgs`` (molink.cli.args) holds the values; the checks run from its ``validate``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from molink.cli.flag_values import check_choice, parse_host_port, size_arg
from molink.errors import InvalidParameterError

if TYPE_CHECKING:
    from molink.cli.args import EngineArgs

# "auto": activations travel in the model dtype, so a pipeline is exact by default.
WIRE_DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32", "int8")
# "off": prefill chunks take the whole token budget (the baseline for benchmarks).
TRANSMISSION_SCHEDULING_CHOICES = ("on", "off")
# "auto": a pipeline node takes part in the swarm's DHT when it can (its initial peer has
# one, the DHT starts), else it joins through its peer alone; "on" makes either an error.
DHT_CHOICES = ("auto", "on", "off")


def validate_pipeline_settings(args: EngineArgs) -> None:
    """The pipeline's choices and timings, each within its allowed range."""
    check_choice(args.molink_wire_dtype, WIRE_DTYPE_CHOICES, "molink_wire_dtype")
    check_choice(
        args.molink_transmission_scheduling,
        TRANSMISSION_SCHEDULING_CHOICES,
        "molink_transmission_scheduling",
    )
    check_choice(args.molink_dht, DHT_CHOICES, "molink_dht")
    if not 2.0 <= args.molink_dht_ttl <= 3600.0:
        raise InvalidParameterError(
            "molink_dht_ttl", f"{args.molink_dht_ttl} must be in [2, 3600] seconds"
        )
    if args.molink_layer_step_ms is not None and not (
        0.001 <= args.molink_layer_step_ms <= 60000.0
    ):
        raise InvalidParameterError(
            "molink_layer_step_ms",
            f"{args.molink_layer_step_ms} must be in [0.001, 60000] milliseconds",
        )
    if not 0.1 <= args.molink_failover_timeout <= 3600.0:
        raise InvalidParameterError(
            "molink_failover_timeout",
            f"{args.molink_failover_timeout} must be in [0.1, 3600] seconds",
        )
    if not 3.0 <= args.molink_lease_timeout <= 3600.0:
        raise InvalidParameterError(
            "molink_lease_timeout", f"{args.molink_lease_timeout} must be in [3, 3600] seconds"
        )


def validate_pipeline_layout(args: EngineArgs) -> None:
    """Micro-batches, the layer span, the initial peer, and --molink-enabled for all of them."""
    if args.molink_micro_batches < 0:
        raise InvalidParameterError("molink_micro_batches", "must be >= 0 (0: automatic)")
    start, end = args.molink_start_layer, args.molink_end_layer
    if start < 0:
        raise InvalidParameterError("molink_start_layer", f"must be >= 0, got {start}")
    if end != -1 and end <= start:
        raise InvalidParameterError(
            "molink_end_layer",
            f"must be greater than --molink-start-layer ({start}) or -1 for the last "
            f"layer, got {end}",
        )
    if args.molink_initial_peer is not None:
        parse_host_port(args.molink_initial_peer, "molink_initial_peer")
    if not args.molink_enabled:
        _require_enabled(args)
    elif args.molink_grpc_port == args.port:
        raise InvalidParameterError(
            "molink_grpc_port", f"must differ from the HTTP --port ({args.port})"
        )


def _require_enabled(args: EngineArgs) -> None:
    """Pipeline flags without --molink-enabled would be silently ignored; refuse instead."""
    if args.molink_start_layer != 0 or args.molink_end_layer != -1:
        field = "molink_start_layer" if args.molink_start_layer != 0 else "molink_end_layer"
        raise InvalidParameterError(
            field,
            "a partial layer range needs --molink-enabled (it only makes sense in a pipeline)",
        )
    if args.molink_initial_peer is not None:
        raise InvalidParameterError(
            "molink_initial_peer", "joining a pipeline needs --molink-enabled"
        )


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """The "MoLink pipeline" group of flags, with its defaults shown in --help."""
    pipeline = parser.add_argument_group("MoLink pipeline")
    pipeline.add_argument(
        "--molink-enabled",
        action="store_true",
        help="serve as one stage of a distributed pipeline (default: off)",
    )
    pipeline.add_argument(
        "--molink-grpc-port",
        type=int,
        default=50061,
        help="gRPC port for the other stages (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-start-layer",
        type=int,
        default=None,
        help="first decoder layer held here, inclusive (default: 0; with neither layer flag "
        "and --molink-initial-peer, the node picks its layers from the swarm)",
    )
    pipeline.add_argument(
        "--molink-end-layer",
        type=int,
        default=None,
        help="end layer, exclusive; -1 for the last (default: -1)",
    )
    pipeline.add_argument(
        "--molink-max-memory",
        type=size_arg,
        default=None,
        help="memory for this node's layers and KV when it picks its own layers, e.g. 4GiB, "
        "all its tensor-parallel ranks together "
        "(default: what the machine has available, less a quarter)",
    )
    pipeline.add_argument(
        "--molink-layer-step-ms",
        type=float,
        default=None,
        help="this node's speed as placement compares it: milliseconds one decoder layer "
        "takes for a 16-token step; set it to skip the probe or to pin the figure on a "
        "machine whose load varies (default: measured at start)",
    )
    pipeline.add_argument(
        "--molink-initial-peer",
        default=None,
        metavar="HOST:PORT",
        help="gRPC address of a running stage to join (default: none, start a new pipeline)",
    )
    pipeline.add_argument(
        "--molink-advertise-host",
        default=None,
        help="address other stages use to reach this one (default: detected)",
    )
    pipeline.add_argument(
        "--molink-advertise-port",
        type=int,
        default=None,
        help="gRPC port other stages dial, when a proxy or NAT forwards it to "
        "--molink-grpc-port (default: the --molink-grpc-port)",
    )
    pipeline.add_argument(
        "--molink-micro-batches",
        type=int,
        default=0,
        help="micro-batches in flight; 0 to follow the measured compute and links "
        "(default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-wire-dtype",
        default="auto",
        choices=WIRE_DTYPE_CHOICES,
        help="dtype of activations between stages; auto: the model dtype, exact (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-transmission-scheduling",
        default="on",
        choices=TRANSMISSION_SCHEDULING_CHOICES,
        help="cap the prefill tokens in flight so that decodes are not stuck behind prompts "
        "on slow links; off sends prefills in whole token-budget chunks (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-dht",
        default="auto",
        choices=DHT_CHOICES,
        help="announce this node in the swarm's DHT and find the others there; a node with "
        "--molink-initial-peer bootstraps from that peer's DHT address. auto: so, unless the "
        "initial peer takes part in no DHT or the DHT cannot start (then the node joins "
        "through its peer alone); on: either is an error; off: no DHT, nodes join through "
        "their initial peer's registry only (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-dht-ttl",
        type=float,
        default=15.0,
        help="seconds a node's DHT record lives unless renewed; nodes renew every third of "
        "it (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-failover-timeout",
        type=float,
        default=30.0,
        help="seconds requests whose node was lost wait for another node to serve its layers "
        "before they end with a 503 (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-lease-timeout",
        type=float,
        default=10.0,
        help="seconds a stage keeps a head's sequences after the head fell silent; the head "
        "renews the lease every second (default: %(default)s)",
    )
