"""Of one node's records a reader takes the newest, and a node that left stays gone: an
older copy that a DHT peer or cache still holds is not read as current."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.discovery.newest import NewestRecords, SequenceClock, SwarmRecord
from molink.discovery.records import record_of
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from tests.helpers.dht_answers import answered

MODEL = toy_identity(4)
TTL = 15.0
OLD = NodeInfo("s1", MODEL, LayerRange(2, 4), "127.0.0.1:5", 10, 16)
NEW = dataclasses.replace(OLD, layers=LayerRange(1, 4), address="127.0.0.1:7")


class _Entry:
    def __init__(self, value: object, expiration_time: float) -> None:
        self.value = value
        self.expiration_time = expiration_time


class _FakeDHT:
    """Answers each reading with the next of the given answers (the copies a merge chose)."""

    def __init__(self, *answers: dict[str, _Entry]) -> None:
        self._answers = list(answers)

    def get(self, key: str, latest: bool, return_future: bool = False) -> Any:
        return answered(_Entry(self._answers.pop(0), 0.0), return_future)


def _directory(*answers: dict[str, _Entry]) -> SwarmDirectory:
    directory = SwarmDirectory(MODEL, OLD.protocol_version)
    directory._dht = _FakeDHT(*answers)
    return directory


def _entry(info: NodeInfo, seq: int, leaving: bool = False, left_s: float = 10.0) -> _Entry:
    from hivemind.utils import get_dht_time

    return _Entry(record_of(info, TTL, seq, leaving), get_dht_time() + left_s)


def test_an_older_record_read_after_a_newer_one_is_not_current() -> None:
    directory = _directory(
        {"s1": _entry(NEW, seq=2)},
        {"s1": _entry(OLD, seq=1, left_s=12.0)},  # an old copy that expires later
    )
    assert directory.nodes()["s1"][0] == NEW
    (record,) = directory.records()
    assert record.info == NEW and record.expires_in_s <= 10.0


def test_a_node_that_left_does_not_come_back_from_an_older_record() -> None:
    directory = _directory(
        {"s1": _entry(OLD, seq=1)},
        {"s1": _entry(OLD, seq=2, leaving=True)},
        {"s1": _entry(OLD, seq=1)},
        {"s1": _entry(NEW, seq=3)},  # it comes back: a newer record
    )
    assert list(directory.nodes()) == ["s1"] and directory.left() == set()
    assert directory.nodes() == {} and directory.left() == {"s1"}
    assert directory.nodes() == {}
    assert directory.nodes()["s1"][0] == NEW and directory.left() == set()


def test_records_that_do_not_say_their_number_are_read_as_before() -> None:
    plain = {k: v for k, v in record_of(NEW, TTL).items() if k not in ("seq", "leaving")}
    from hivemind.utils import get_dht_time

    directory = _directory({"s1": _Entry(plain, get_dht_time() + 5)})
    assert directory.nodes()["s1"][0] == NEW


def test_the_newest_is_kept_only_while_it_lives() -> None:
    now = [100.0]
    newest = NewestRecords(clock=lambda: now[0])
    assert newest.choose(5, True, SwarmRecord(OLD, 3.0, 12.0)) is None
    now[0] += 2.0
    assert newest.choose(4, False, SwarmRecord(OLD, 9.0, 6.0)) is None  # still gone
    now[0] += 1.5  # the leaving record has expired: a clock that stepped back is believed
    read = SwarmRecord(NEW, 9.0, 6.0)
    assert newest.choose(4, False, read) == read
    now[0] += 1.0
    kept = newest.choose(3, False, SwarmRecord(OLD, 9.0, 6.0))
    assert kept is not None and kept.info == NEW
    assert (kept.expires_in_s, kept.age_s) == pytest.approx((8.0, 7.0))
    now[0] += 20.0
    newest.forget_expired({"s1"})  # expired, but still in the DHT: remembered as such
    assert list(newest._kept) == ["s1"]
    newest.forget_expired(set())
    assert newest._kept == {}


def test_announcement_numbers_rise_even_when_the_clock_steps_back() -> None:
    ticks = iter([1000, 1000, 400, 2000])
    clock = SequenceClock(clock=lambda: next(ticks))
    assert [clock.next() for _ in range(4)] == [1000, 1001, 1002, 2000]


class _StoringDHT:
    """hivemind's storage rule: per subkey, a copy is stored only if it expires later."""

    def __init__(self) -> None:
        self.stored: dict[str, _Entry] = {}
        self.offered: list[tuple[dict, float]] = []

    def store(self, key, value, expiration_time, subkey, return_future=False):
        self.offered.append((value, expiration_time))
        before = self.stored.get(subkey)
        accepted = before is None or expiration_time > before.expiration_time
        if accepted:
            self.stored[subkey] = _Entry(value, expiration_time)

        class _Done:
            def result(self, timeout: float) -> bool:
                return accepted

        return _Done() if return_future else accepted

    def get(self, key: str, latest: bool, return_future: bool = False) -> Any:
        found = _Entry(dict(self.stored), 0.0) if self.stored else None
        return answered(found, return_future)

    def is_alive(self) -> bool:
        return True


def _storing_directory(dht: _StoringDHT) -> SwarmDirectory:
    directory = SwarmDirectory(MODEL, OLD.protocol_version)
    directory._dht = dht
    return directory


def test_a_directory_numbers_its_announcements_and_its_leaving() -> None:
    from hivemind.utils import get_dht_time

    dht = _StoringDHT()
    directory = _storing_directory(dht)
    assert directory.announce(OLD, TTL)
    directory.withdraw(OLD, TTL)
    (first, first_expiry), (leaving, leaving_expiry) = dht.offered
    assert first["seq"] < leaving["seq"] and not first["leaving"] and leaving["leaving"]
    # the leaving record outranks every earlier copy in a DHT merge: it expires later
    assert leaving_expiry >= first_expiry and leaving_expiry > get_dht_time() + TTL - 1


def test_a_node_back_with_a_shorter_lifetime_outlasts_its_former_records() -> None:
    # Its leaving record (or a former run's record) expires later than a record with the
    # new, shorter lifetime would: the DHT refused every announcement until it expired.
    dht = _StoringDHT()
    former = _storing_directory(dht)
    assert former.announce(OLD, 60.0)
    former.withdraw(OLD, 60.0)
    back = _storing_directory(dht)  # the node's next run
    assert back.announce(NEW, 5.0)
    assert back.nodes()["s1"][0] == NEW
    renewed = back.announce(NEW, 5.0)  # a renewal refused the same way is stored too
    assert renewed and dht.stored["s1"].value["seq"] == dht.offered[-1][0]["seq"]
    assert dht.stored["s1"].value["ttl"] > 60.0 - 1  # it lives as long as the copy it outlasts


def test_a_node_whose_clock_runs_ahead_still_goes_when_it_stops_renewing() -> None:
    # Its record expires by its own clock, an hour late: it was read as serving for an
    # hour after the node died. Its lifetime now runs on the reader's clock.
    now = [100.0]
    newest = NewestRecords(clock=lambda: now[0])
    ahead = SwarmRecord(NEW, 3600.0 + TTL, 0.0)
    first = newest.choose(7, False, ahead, TTL)
    assert first is not None and first.expires_in_s == TTL
    now[0] += TTL - 1
    again = newest.choose(7, False, ahead, TTL)  # the same announcement: not renewed
    assert again is not None and again.expires_in_s == pytest.approx(1.0)
    now[0] += 2
    assert newest.choose(7, False, ahead, TTL) is None  # dead, though the DHT keeps it
    renewed = newest.choose(8, False, ahead, TTL)  # a renewal: a new number
    assert renewed is not None and renewed.expires_in_s == TTL


def test_a_directory_counts_a_skewed_records_lifetime_itself() -> None:
    from hivemind.utils import get_dht_time

    ahead = _Entry(record_of(NEW, TTL, 9), get_dht_time() + 3600 + TTL)
    directory = _directory({"s1": ahead})
    (record,) = directory.records()
    assert record.expires_in_s == TTL


def test_a_node_whose_clock_is_behind_shows_its_age_on_the_readers_clock() -> None:
    # Its records expire early by its own clock, so each reads as 8 s older than it is:
    # beyond two thirds of its lifetime the dashboard called a node that renews "missing".
    # Once the reader has read an announcement of it, the next one is no older than the
    # time since that reading.
    behind = 8.0
    now = [100.0]
    newest = NewestRecords(clock=lambda: now[0])
    first = newest.choose(7, False, SwarmRecord(NEW, TTL - behind, behind), TTL)
    assert first is not None and first.age_s == behind  # nothing tells the skew yet
    for _ in range(4):  # read once a second; it renews every TTL / 3 = 5 s
        now[0] += 1.0
        again = newest.choose(7, False, SwarmRecord(NEW, TTL - behind, behind), TTL)
        assert again is not None and again.age_s == pytest.approx(behind + now[0] - 100.0)
    now[0] += 1.0  # renewed 0.5 s ago: at 105 - 0.5 on the reader's clock
    renewed = newest.choose(8, False, SwarmRecord(NEW, TTL - behind - 0.5, behind + 0.5), TTL)
    assert renewed is not None and renewed.age_s == pytest.approx(1.0)  # was 8.5
    now[0] += 2.0
    later = newest.choose(8, False, SwarmRecord(NEW, TTL - behind - 2.5, behind + 2.5), TTL)
    assert later is not None and later.age_s == pytest.approx(3.0)  # was 10.5: "missing"


def test_a_directory_counts_a_renewed_records_age_itself() -> None:
    from hivemind.utils import get_dht_time

    def behind(seq: int) -> _Entry:  # announced now by a clock 8 s behind the reader's
        return _Entry(record_of(NEW, TTL, seq), get_dht_time() + TTL - 8.0)

    directory = _directory({"s1": behind(9)}, {"s1": behind(10)})
    (first,) = directory.records()
    assert first.age_s == pytest.approx(8.0, abs=0.5)
    (renewed,) = directory.records()
    assert renewed.age_s < 0.5  # read 8 s old before
