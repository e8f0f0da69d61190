"""The rate clock and the delay line, driven by a fake clock (plain float times)."""

from __future__ import annotations

import math
import random

import pytest

from molink.netem import DelayLine, LinkSpec, RateClock

# 8 Mbit/s is 1e6 bytes/s: 1000 bytes take exactly 1 ms, which keeps the arithmetic readable.
SPEC = LinkSpec(rate_mbit=8.0, one_way_delay_ms=20.0, queue_ms=10.0)


def test_back_to_back_chunks_leave_at_the_link_rate() -> None:
    clock = RateClock(SPEC)
    assert clock.schedule(1000, now=0.0) == pytest.approx(0.001)
    assert clock.schedule(1000, now=0.0) == pytest.approx(0.002)
    assert clock.schedule(500, now=0.0015) == pytest.approx(0.0025)


def test_an_idle_link_starts_at_now() -> None:
    clock = RateClock(SPEC)
    clock.schedule(1000, now=0.0)
    # The wire was idle from 1 ms to 1 s; idle time is not banked as credit.
    assert clock.schedule(1000, now=1.0) == pytest.approx(1.001)


def test_backlog_and_room() -> None:
    clock = RateClock(SPEC)
    for _ in range(12):
        clock.schedule(1000, now=0.0)
    assert clock.backlog_s(0.0) == pytest.approx(0.012)
    assert clock.backlog_s(1.0) == 0.0
    assert clock.ready_at() == pytest.approx(0.002)
    assert not clock.has_room(0.0019)
    assert clock.has_room(0.0021)


def test_unlimited_rate_never_queues() -> None:
    clock = RateClock(LinkSpec(math.inf, 5.0))
    assert clock.schedule(10**9, now=3.0) == 3.0
    assert clock.has_room(3.0)


def test_delay_line_holds_each_chunk_for_the_delay() -> None:
    line = DelayLine(SPEC.delay_s)
    assert line.push(departure=0.001, data=b"a" * 1000) == pytest.approx(0.021)
    assert line.push(departure=0.002, data=b"b" * 1000) == pytest.approx(0.022)
    assert line.buffered_bytes == 2000
    assert line.pop_due(0.0209).chunks == []
    first = line.pop_due(0.021)
    assert first.chunks == [b"a" * 1000] and not first.eof
    assert line.buffered_bytes == 1000
    assert line.next_due() == pytest.approx(0.022)


def test_pop_due_batches_everything_that_is_due() -> None:
    line = DelayLine(0.010)
    for i in range(5):
        line.push(departure=i * 0.001, data=bytes([i]))
    delivery = line.pop_due(0.0135)
    assert delivery.chunks == [b"\x00", b"\x01", b"\x02", b"\x03"]
    assert delivery.nbytes == 4
    assert len(line) == 1


def test_end_of_stream_follows_the_data() -> None:
    line = DelayLine(0.010)
    line.push(departure=0.005, data=b"tail")
    # End of stream seen at 1 ms still arrives after the tail, which is due at 15 ms.
    assert line.push_eof(departure=0.001) == pytest.approx(0.015)
    assert line.pop_due(0.014).chunks == []
    delivery = line.pop_due(0.015)
    assert delivery.chunks == [b"tail"] and delivery.eof
    assert line.next_due() is None
    with pytest.raises(RuntimeError):
        line.push(0.02, b"late")


def test_round_trip_of_a_small_message() -> None:
    up, down = RateClock(SPEC), RateClock(SPEC)
    up_line, down_line = DelayLine(SPEC.delay_s), DelayLine(SPEC.delay_s)
    at_server = up_line.push(up.schedule(100, now=0.0), b"p" * 100)
    back = down_line.push(down.schedule(100, now=at_server), b"p" * 100)
    # Two one-way delays plus 100 bytes of serialisation (0.1 ms) in each direction.
    assert back == pytest.approx(0.040 + 0.0002)


def _simulate_bulk(total: int, wake_jitter_s: float, seed: int) -> tuple[float, float]:
    """A sender with unlimited data, read by a reader that wakes up late by random amounts.

    Mirrors the emulator's read side: wait until the queue has room, read one chunk,
    schedule it. Returns the arrival times of the first and last byte.
    """
    rng = random.Random(seed)
    clock, line = RateClock(SPEC), DelayLine(SPEC.delay_s)
    now, sent, first_due, last_due = 0.0, 0, math.nan, math.nan
    while sent < total:
        if not clock.has_room(now):
            now = clock.ready_at() + rng.uniform(0.0, wake_jitter_s)
        n = min(SPEC.chunk_bytes, total - sent)
        last_due = line.push(clock.schedule(n, now), b"x" * n)
        first_due = last_due if sent == 0 else first_due
        sent += n
        now += rng.uniform(0.0, 0.0002)  # the cost of one read
    return first_due, last_due


@pytest.mark.parametrize("jitter_ms", [0.0, 2.0, 8.0])
def test_late_wakeups_do_not_lower_the_rate(jitter_ms: float) -> None:
    total = 2_000_000
    first, last = _simulate_bulk(total, jitter_ms / 1e3, seed=7)
    rate = (total - SPEC.chunk_bytes) / (last - first)
    # As long as a wake-up is later by less than the queue, the wire never idles.
    assert rate == pytest.approx(SPEC.bytes_per_s, rel=1e-9)
    assert first == pytest.approx(SPEC.serialization_s(SPEC.chunk_bytes) + SPEC.delay_s)


def test_wakeups_later_than_the_queue_leave_the_wire_idle() -> None:
    total = 2_000_000
    first, last = _simulate_bulk(total, 0.030, seed=7)
    rate = (total - SPEC.chunk_bytes) / (last - first)
    assert rate < 0.9 * SPEC.bytes_per_s
