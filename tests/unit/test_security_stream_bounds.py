"""A node keeps one outgoing stream (a gRPC channel and a sending thread) per peer
address it sends steps to, and one per head address it returns results to. Routes name
those addresses, and any member can make itself a head whose signed routes name any
number of them: the streams a node keeps are bounded, the least recently used one with
nothing in flight closed first; a stream with messages in flight is never closed."""

from __future__ import annotations

from typing import Any

from molink.pipeline.links import MAX_STREAMS_PER_KIND, LinkTable


class _FakeSender:
    def __init__(self, address: str) -> None:
        self.address = address
        self.closed = False
        self.in_flight = 0
        self.bytes_sent = 0
        self.observer = None

    def pending(self) -> int:
        return self.in_flight

    def close(self, timeout: float = 2.0) -> None:
        self.closed = True


def _table(made: list[_FakeSender]) -> LinkTable:
    def make(address: str, node_id: str) -> Any:
        made.append(_FakeSender(address))
        return made[-1]

    return LinkTable("s", make, make)


def test_forward_streams_are_bounded_least_recently_used_first() -> None:
    made: list[_FakeSender] = []
    links = _table(made)
    busy = links.forward_to("10.0.0.0:1", "busy")
    busy.in_flight = 1  # a message not yet acknowledged: never closed under it
    kept = links.forward_to("10.0.0.1:1", "kept")
    for index in range(MAX_STREAMS_PER_KIND + 20):
        links.forward_to(f"10.1.{index // 256}.{index % 256}:1", f"minted-{index}")
        assert links.forward_to("10.0.0.1:1", "kept") is kept  # used again: kept
    open_ = [s for s in made if not s.closed]
    assert len(open_) == MAX_STREAMS_PER_KIND
    assert not busy.closed and not kept.closed
    assert all(s.closed for s in made[2:22])  # the oldest idle ones went first
    assert len(links.outgoing()) == MAX_STREAMS_PER_KIND


def test_result_streams_are_bounded_too() -> None:
    made: list[_FakeSender] = []
    links = _table(made)
    for index in range(MAX_STREAMS_PER_KIND + 5):
        links.results_to(f"10.2.{index // 256}.{index % 256}:1", f"head-{index}")
    assert len([s for s in made if not s.closed]) == MAX_STREAMS_PER_KIND
    assert all(s.closed for s in made[:5])
