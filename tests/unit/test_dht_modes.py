"""``--molink-dht``: auto (the default) joins the swarm's DHT when the initial peer has
one and the DHT starts, else goes without; on makes either an error; off never joins. A
DHT's address names the host other machines reach the node at."""

from __future__ import annotations

import argparse
import logging

import pytest

from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.main import parse_engine_args
from molink.discovery import setup
from molink.discovery.dht import SwarmDirectory, advertised_maddr
from molink.errors import PipelineError
from molink.pipeline.toy import toy_identity
from molink.transport.config import TransportConfig

MODEL = toy_identity(4)
PEER_DHT = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWPeer"


class _Started:
    """Stands in for hivemind: records how the DHT was started, or fails."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.calls: list[tuple[str, list[str], str | None]] = []

    def start(self, directory, host, peers, client_mode=False, advertise_host=None):
        self.calls.append((host, list(peers), advertise_host))
        if self.fail:
            raise PipelineError("could not join the DHT through x within 30s: refused")
        return directory


@pytest.fixture
def dht(monkeypatch: pytest.MonkeyPatch) -> _Started:
    started = _Started()
    monkeypatch.setattr(SwarmDirectory, "start", lambda d, *a, **k: started.start(d, *a, **k))
    return started


def _peer_answers(monkeypatch: pytest.MonkeyPatch, dht_address: str) -> list[float]:
    budgets: list[float] = []

    def answer(peer: str, config: TransportConfig, budget_s: float) -> str:
        budgets.append(budget_s)
        return dht_address

    monkeypatch.setattr(setup, "peer_dht_address", answer)
    return budgets


def _join(mode: str, peer: str | None = "10.0.0.1:50061") -> SwarmDirectory | None:
    return setup.join_directory(mode, MODEL, peer, "0.0.0.0", "10.0.0.2", TransportConfig())


def test_the_default_is_auto() -> None:
    assert EngineArgs().molink_dht == "auto"
    parser = add_engine_args(argparse.ArgumentParser(prog="test"))
    assert parse_engine_args(parser, parser.parse_args(["--molink-enabled"])).molink_dht == "auto"


def test_auto_joins_the_peers_dht_waiting_as_long_as_a_join(monkeypatch, dht) -> None:
    budgets = _peer_answers(monkeypatch, PEER_DHT)
    assert isinstance(_join("auto"), SwarmDirectory)
    assert dht.calls == [("0.0.0.0", [PEER_DHT], "10.0.0.2")]
    assert budgets == [TransportConfig().join_timeout_s]


def test_a_head_without_a_peer_starts_a_dht_of_its_own(monkeypatch, dht) -> None:
    budgets = _peer_answers(monkeypatch, PEER_DHT)
    assert isinstance(_join("auto", peer=None), SwarmDirectory)
    assert dht.calls == [("0.0.0.0", [], "10.0.0.2")] and budgets == []


def test_auto_goes_without_when_the_peer_has_no_dht(monkeypatch, dht, caplog) -> None:
    _peer_answers(monkeypatch, "")
    with caplog.at_level(logging.INFO):
        assert _join("auto") is None
    assert dht.calls == []
    assert "takes part in no DHT: this node joins through it alone" in caplog.text


def test_on_refuses_a_peer_without_a_dht(monkeypatch, dht) -> None:
    _peer_answers(monkeypatch, "")
    with pytest.raises(PipelineError, match="10.0.0.1:50061 takes part in no DHT"):
        _join("on")


def test_auto_goes_without_a_dht_that_does_not_start(monkeypatch, caplog) -> None:
    failing = _Started(fail=True)
    monkeypatch.setattr(SwarmDirectory, "start", lambda d, *a, **k: failing.start(d, *a, **k))
    _peer_answers(monkeypatch, PEER_DHT)
    with caplog.at_level(logging.WARNING):
        assert _join("auto") is None
    assert "taking part in no DHT: could not join the DHT" in caplog.text
    with pytest.raises(PipelineError, match="could not join the DHT"):
        _join("on")


def test_off_never_asks_the_peer(monkeypatch, dht) -> None:
    budgets = _peer_answers(monkeypatch, PEER_DHT)
    assert _join("off") is None
    assert budgets == [] and dht.calls == []


def test_an_unreachable_peer_is_an_error_in_auto_too(monkeypatch, dht) -> None:
    def unreachable(peer: str, config: TransportConfig, budget_s: float) -> str:
        raise PipelineError(f"could not reach the initial peer {peer}")

    monkeypatch.setattr(setup, "peer_dht_address", unreachable)
    with pytest.raises(PipelineError, match="could not reach the initial peer"):
        _join("auto")


LISTENING = [
    "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWSelf",
    "/ip4/192.168.1.7/tcp/4001/p2p/12D3KooWSelf",
]


@pytest.mark.parametrize(
    ("advertise", "expected"),
    [
        (None, LISTENING[0]),
        ("127.0.0.1", LISTENING[0]),
        ("192.168.1.7", LISTENING[1]),
        # Behind NAT or a forwarder: the advertised host, on the DHT's own port.
        ("203.0.113.5", "/ip4/203.0.113.5/tcp/4001/p2p/12D3KooWSelf"),
        ("::1", "/ip6/::1/tcp/4001/p2p/12D3KooWSelf"),
        ("[2001:db8::1]", "/ip6/2001:db8::1/tcp/4001/p2p/12D3KooWSelf"),
        ("head", "/dns/head/tcp/4001/p2p/12D3KooWSelf"),
    ],
)
def test_the_dht_address_names_the_advertised_host(advertise: str | None, expected: str) -> None:
    assert advertised_maddr(LISTENING, advertise) == expected


def test_no_listening_address_is_no_dht_address() -> None:
    assert advertised_maddr([], "10.0.0.2") == ""
