"""Real sockets through the link emulator: latency and rate in each direction.

The machine running these is shared and busy, so the bounds are loose on the side that load
can push (later, slower) and tight on the side it cannot (a message never arrives early, a
transfer never beats the cap). ``bench/netem_check.py`` holds the strict figures.
"""

from __future__ import annotations

import socket
import statistics
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from molink.netem import LinkEmulator, LinkSpec
from molink.netem.probe import (
    ProbeServer,
    bulk_down,
    bulk_up,
    connect,
    measure_rtt,
    open_echo,
    ping,
)

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
BULK_BYTES = 3_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[ProbeServer]:
    with ProbeServer(HOST) as srv:
        yield srv


def _emulator(server: ProbeServer, up: LinkSpec, down: LinkSpec | None = None) -> LinkEmulator:
    return LinkEmulator(HOST, 0, HOST, server.port, up=up, down=down)


def test_small_message_round_trip(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec(100, 20)) as emu:
        rtts = measure_rtt(HOST, emu.port, count=15)
    # Two 20 ms one-way delays; scheduling can only add to them.
    assert min(rtts) >= 40.0
    assert statistics.median(rtts) < 55.0


def test_rtt_option_splits_the_round_trip(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec.parse("100mbit/30ms-rtt")) as emu:
        rtts = measure_rtt(HOST, emu.port, count=8)
    # The fastest round trip is the emulated one: host load only ever adds to it, so the
    # minimum tells a 30 ms round trip from one that delays each way by 30 ms (60).
    assert 30.0 <= min(rtts) < 45.0


def test_asymmetric_delay(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec(100, 5), LinkSpec(100, 25)) as emu:
        rtts = measure_rtt(HOST, emu.port, count=8)
    # The fastest round trip is the emulated one: host load only ever adds to it, so the
    # minimum tells 5+25 ms (30) from a link that delays both ways by 25 ms (50).
    assert 30.0 <= min(rtts) < 45.0


def test_bulk_rate_up(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec(100, 5)) as emu:
        result = bulk_up(HOST, emu.port, BULK_BYTES)
        assert emu.bytes_up >= BULK_BYTES
    assert 60.0 <= result.steady_mbit <= 103.0
    assert result.total_mbit <= 100.0


def test_bulk_rate_down(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec(100, 5)) as emu:
        result = bulk_down(HOST, emu.port, BULK_BYTES)
        assert emu.bytes_down == BULK_BYTES
    assert 60.0 <= result.steady_mbit <= 103.0
    assert result.total_mbit <= 100.0


def test_directions_are_capped_independently(server: ProbeServer) -> None:
    with _emulator(server, up=LinkSpec(100, 2), down=LinkSpec(20, 2)) as emu:
        down = bulk_down(HOST, emu.port, 750_000)
        up = bulk_up(HOST, emu.port, BULK_BYTES)
    assert 14.0 <= down.steady_mbit <= 20.6
    assert 60.0 <= up.steady_mbit <= 103.0


def test_connections_share_the_link(server: ProbeServer) -> None:
    results: list[float] = []
    with _emulator(server, LinkSpec(40, 2)) as emu:

        def one() -> None:
            results.append(bulk_down(HOST, emu.port, 1_000_000).steady_mbit)

        threads = [threading.Thread(target=one) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30.0)
    assert len(results) == 2
    # Two transfers on one 40 Mbit/s wire: neither gets the whole of it.
    assert all(r <= 32.0 for r in results), results


def test_small_message_behind_a_bulk_transfer_waits_at_most_a_queue(server: ProbeServer) -> None:
    with _emulator(server, LinkSpec(100, 10)) as emu, open_echo(HOST, emu.port) as sock:
        ping(sock)
        bulk = threading.Thread(target=bulk_up, args=(HOST, emu.port, 2_000_000))
        bulk.start()
        try:
            rtts = [ping(sock) for _ in range(5)]
        finally:
            bulk.join(30.0)
    # 20 ms of delay plus at most the 10 ms queue (and one chunk), plus scheduling slack.
    assert min(rtts) >= 20.0
    assert statistics.median(rtts) < 45.0


def test_payload_is_unchanged(server: ProbeServer) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB with a recognisable pattern
    n = len(payload)
    with _emulator(server, LinkSpec(1000, 1)) as emu, open_echo(HOST, emu.port) as sock:
        sock.sendall(payload)
        got = bytearray()
        while len(got) < n:
            data = sock.recv(65536)
            assert data, "stream ended early"
            got += data
        assert bytes(got) == payload, "payload changed in transit"
        stats = emu.stats()
    assert stats.bytes_up == n + 1  # the probe's one-byte command, then the payload
    assert stats.bytes_down == n
    assert stats.connections_total == 1


def test_a_receiver_that_stops_reading_holds_back_the_sender(server: ProbeServer) -> None:
    spec = LinkSpec(1000, 1)
    with _emulator(server, spec) as emu, connect(HOST, emu.port, timeout_s=5.0) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"O" + struct.pack("!Q", 500_000_000))  # far more than fits in memory
        time.sleep(1.0)
        stats = emu.stats()
        delivered = stats.bytes_down
        time.sleep(0.2)
        assert emu.stats().bytes_down == delivered, "nothing reads, so nothing moves"
        # The emulator holds at most its per-connection limit; the rest waits in the sender.
        assert 0 < stats.buffered_down <= spec.buffer_limit_bytes + spec.chunk_bytes
        assert delivered < 50_000_000
    assert emu.stats().buffered_down == 0
