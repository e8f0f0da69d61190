"""The spot checks' judge asks the node after a checked span what it received, keeping
one client (a gRPC channel) per node address it asked. Routes change as nodes come and
go at new addresses, and any member can join under fresh ids and ports: the judge keeps
at most MAX_WITNESS_CLIENTS clients, closing the least recently used first."""

from __future__ import annotations

import logging

import pytest

from molink.pipeline import spot_judge
from molink.pipeline.spot_judge import MAX_WITNESS_CLIENTS, CheckedStep, SpotJudge
from molink.placement.route import RouteHop
from molink.security.bans import BanList, Verdicts
from molink.security.peer_text import MAX_PEER_TEXT_CHARS
from molink.security.spot_check import SpotChecker, tolerance_for
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb


class _FakeClient:
    def __init__(self, address: str, config: TransportConfig, node_id: str) -> None:
        self.address = address
        self.expected_node_id = node_id
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_the_judge_keeps_a_bounded_number_of_witness_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(spot_judge, "NodeClient", _FakeClient)
    judge = SpotJudge(
        SpotChecker(1.0, Verdicts(BanList()), tolerance_for("float32")), "h", TransportConfig()
    )
    try:
        made = [judge._client(f"10.0.{i // 256}.{i % 256}:1", f"n{i}") for i in range(8)]
        kept = made[0]
        for index in range(8, MAX_WITNESS_CLIENTS + 20):
            made.append(judge._client(f"10.0.{index // 256}.{index % 256}:1", f"n{index}"))
            assert judge._client(kept.address, "n0") is kept  # asked again: kept
        assert len([c for c in made if not c.closed]) == MAX_WITNESS_CLIENTS
        assert not kept.closed and all(c.closed for c in made[1:21])
    finally:
        judge.close()


class _TellingClient(_FakeClient):
    def witness(self, request: pb.WitnessRequest) -> pb.WitnessResponse:
        missing = "\x1b[2J" + "x" * 100_000
        return pb.WitnessResponse(answers=[pb.WitnessAnswer(missing=missing)])


def test_what_a_witness_says_it_lacks_is_logged_bounded_and_printable(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(spot_judge, "NodeClient", _TellingClient)
    judge = SpotJudge(
        SpotChecker(1.0, Verdicts(BanList()), tolerance_for("float32")), "h", TransportConfig()
    )
    step = CheckedStep(
        1, 0, "a", {}, frozenset(), (4,), RouteHop("w", "x:1", 2, 4), 8, tolerance_for("float32")
    )
    try:
        with caplog.at_level(logging.INFO, logger="molink.pipeline.spot_judge"):
            assert judge._witnessed(step) == {}
    finally:
        judge.close()
    (record,) = [r for r in caplog.records if "spot checks" in r.getMessage()]
    assert len(record.getMessage()) <= MAX_PEER_TEXT_CHARS + 80
    assert record.getMessage().isprintable()
