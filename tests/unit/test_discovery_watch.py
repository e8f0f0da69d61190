"""The head's watch drops a node when its record expires or it leaves, not when one
reading of the DHT comes back empty or short while the node's record still lives."""

from __future__ import annotations

from molink.config import LayerRange
from molink.discovery.dht import SwarmRecord
from molink.discovery.watch import DiscoveryWatch
from molink.pipeline.identity import NodeInfo
from tests.unit.test_dashboard_records import TTL_S, FakeDirectory, FakeDiscoveringHead
from tests.unit.test_dashboard_snapshot import MODEL, Clock

STAGE = NodeInfo("s1", MODEL, LayerRange(15, 30), "s1:1")


class ReadingDirectory:
    """Answers each reading with what ``entries`` holds then; ``left`` as the DHT said."""

    def __init__(self) -> None:
        self.entries: dict[str, float] = {}  # node id -> seconds its record has left
        self.gone: set[str] = set()

    def records(self) -> list[SwarmRecord]:
        return [SwarmRecord(STAGE, left, TTL_S - left) for left in self.entries.values()]

    def left(self) -> set[str]:
        return set(self.gone)


def _watch() -> tuple[DiscoveryWatch, ReadingDirectory, FakeDiscoveringHead, Clock]:
    directory, head, clock = ReadingDirectory(), FakeDiscoveringHead(), Clock()
    watch = DiscoveryWatch(directory, head, interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    return watch, directory, head, clock


def test_a_reading_that_misses_a_live_record_does_not_drop_its_node() -> None:
    # A DHT reading that fails or comes back short (no peer answered in time) read as
    # "every record expired": the head dropped every node at once.
    watch, directory, head, clock = _watch()
    directory.entries["s1"] = TTL_S
    watch.check_once()
    assert "s1" in head.known
    directory.entries.clear()  # one empty reading, 2 s later
    clock.now += 2.0
    watch.check_once()
    assert "s1" in head.known
    directory.entries["s1"] = TTL_S - 4.0  # found again
    clock.now += 2.0
    watch.check_once()
    assert head.admitted == ["s1"] and "s1" in head.known
    directory.entries.clear()  # it stopped renewing: gone once its record expires
    clock.now += TTL_S - 4.0 - 1.0
    watch.check_once()
    assert "s1" in head.known
    clock.now += 1.0
    watch.check_once()
    assert "s1" not in head.known


def test_a_node_that_left_is_dropped_at_once() -> None:
    watch, directory, head, clock = _watch()
    directory.entries["s1"] = TTL_S
    watch.check_once()
    directory.entries.clear()
    directory.gone.add("s1")
    clock.now += 1.0
    watch.check_once()
    assert "s1" not in head.known


def test_a_node_back_after_its_record_expired_is_admitted_at_its_first_record() -> None:
    # Dropped by the head (health checks), its record expired, and it started again: its
    # first record was taken for the dead node's leftover, and it waited for a renewal.
    watch, directory, head, clock = _watch()
    directory.entries["s1"] = TTL_S
    watch.check_once()
    head.known.clear()  # its health checks failed: the head dropped it
    directory.entries.clear()
    clock.now += TTL_S + 1.0  # its record expired
    watch.check_once()
    directory.entries["s1"] = TTL_S  # it runs again
    clock.now += 30.0
    watch.check_once()
    assert head.admitted == ["s1", "s1"] and "s1" in head.known


class RefusingHead(FakeDiscoveringHead):
    def admit_discovered(self, info: NodeInfo) -> str | None:
        return f"{info.node_id} serves another model"


def test_refusals_are_logged_once_and_forgotten_with_their_record(caplog) -> None:
    directory, head, clock = FakeDirectory(), RefusingHead(), Clock()
    watch = DiscoveryWatch(directory, head, interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    for i in range(50):
        directory.entries[f"x{i}"] = (NodeInfo(f"x{i}", MODEL, LayerRange(15, 30), "x:1"), TTL_S)
    with caplog.at_level("WARNING", logger="molink.discovery.watch"):
        watch.check_once()
        watch.check_once()
    assert len([r for r in caplog.records if "not using node" in r.getMessage()]) == 50
    directory.entries.clear()  # their records are gone
    watch.check_once()
    assert watch._refused == {}
