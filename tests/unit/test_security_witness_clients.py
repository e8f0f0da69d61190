"""The spot checks' judge asks the node after a checked span what it received, keeping
one client (a gRPC channel) per node address it asked. Routes change as nodes come and
go at new addresses, and any member can join under fresh ids and ports: the judge keeps
at most MAX_WITNESS_CLIENTS clients, closing the least recently used first."""

from __future__ import annotations

import pytest

from molink.pipeline import spot_judge
from molink.pipeline.spot_judge import MAX_WITNESS_CLIENTS, SpotJudge
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import SpotChecker, tolerance_for
from molink.transport.config import TransportConfig


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
