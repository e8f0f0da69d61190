"""The address a pipeline node advertises: host and port, possibly not the ones it binds."""

from __future__ import annotations

import argparse
import shlex

import pytest

from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.main import parse_engine_args
from molink.cli.stage_loader import advertise_host, advertise_port
from molink.errors import InvalidParameterError
from molink.pipeline.node import _advertised

PIPELINE = "--molink-enabled --molink-grpc-port 50070 --host 127.0.0.1"


def parse(command: str) -> EngineArgs:
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    return parse_engine_args(parser, parser.parse_args(shlex.split(command)))


def test_advertised_port_defaults_to_the_grpc_port() -> None:
    args = parse(PIPELINE)
    assert args.molink_advertise_port is None
    assert (advertise_host(args), advertise_port(args)) == ("127.0.0.1", 50070)


def test_advertised_port_can_differ_from_the_bound_one() -> None:
    # A forwarder (here a link emulator on 40000) sits in front of the port the node binds.
    args = parse(f"{PIPELINE} --molink-advertise-host 10.0.0.5 --molink-advertise-port 40000")
    assert args.molink_grpc_port == 50070
    assert (advertise_host(args), advertise_port(args)) == ("10.0.0.5", 40000)


def test_node_keeps_a_configured_advertised_port() -> None:
    assert _advertised("10.0.0.5:40000", "127.0.0.1:50070", 50070) == "10.0.0.5:40000"


def test_node_fills_in_the_bound_port_when_advertising_port_zero() -> None:
    assert _advertised("10.0.0.5:0", "127.0.0.1:0", 41234) == "10.0.0.5:41234"


@pytest.mark.parametrize("port", [-1, 65536])
def test_out_of_range_advertised_port_is_refused(port: int) -> None:
    with pytest.raises(InvalidParameterError, match="molink_advertise_port"):
        EngineArgs(molink_enabled=True, molink_advertise_port=port)
