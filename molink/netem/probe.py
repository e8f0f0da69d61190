"""Loopback traffic for checking a link: a small threaded server and the client measurements.

The server speaks a one-byte command at the start of each connection:
``E`` echoes until end of stream; ``S`` swallows bytes until end of stream and then reports
when they arrived; ``O`` followed by a 64-bit length sends that many bytes and closes.
Every socket has a timeout, so a broken link fails a check instead of hanging it.
``python -m molink.netem.probe --port-file F`` runs the server in a process of its own.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

_ECHO, _SINK, _SOURCE = b"E", b"S", b"O"
# total bytes, bytes in the first read, first/last read time, fitted arrival rate (bytes/s)
_REPORT = struct.Struct("!QQddd")
_LENGTH = struct.Struct("!Q")
_IO_BYTES = 256 * 1024
_BLOCK = bytes(_IO_BYTES)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        data = sock.recv(n - len(buf))
        if not data:
            raise ConnectionError(f"stream ended after {len(buf)} of {n} bytes")
        buf += data
    return bytes(buf)


def _send_zeros(sock: socket.socket, nbytes: int) -> None:
    view = memoryview(_BLOCK)
    left = nbytes
    while left > 0:
        n = min(left, _IO_BYTES)
        sock.sendall(view[:n])
        left -= n


@dataclass(frozen=True)
class ArrivalReport:
    """How a bulk stream arrived at its receiver (times on the receiver's monotonic clock).

    ``rate`` is the least-squares slope of bytes received against time, in bytes/s. A
    shaped stream arrives in bursts, and a rate taken between the first and last read is
    off by however much of the first burst the first read missed; a fit over every read is
    not.
    """

    nbytes: int
    first_read_bytes: int
    first_t: float
    last_t: float
    rate: float

    def pack(self) -> bytes:
        return _REPORT.pack(
            self.nbytes, self.first_read_bytes, self.first_t, self.last_t, self.rate
        )

    @classmethod
    def unpack(cls, data: bytes) -> ArrivalReport:
        return cls(*_REPORT.unpack(data))


class _RateFit:
    """Running least-squares fit of cumulative bytes against time since the first read."""

    def __init__(self) -> None:
        self.n = 0
        self.st = self.sb = self.stt = self.stb = 0.0

    def add(self, t: float, cum_bytes: int) -> None:
        self.n += 1
        self.st += t
        self.sb += cum_bytes
        self.stt += t * t
        self.stb += t * cum_bytes

    def slope(self) -> float:
        den = self.n * self.stt - self.st * self.st
        if self.n < 3 or den <= 0.0:
            return 0.0
        return (self.n * self.stb - self.st * self.sb) / den


def _receive_all(sock: socket.socket) -> ArrivalReport:
    total = first_len = 0
    first_t = last_t = time.monotonic()
    fit = _RateFit()
    while True:
        data = sock.recv(_IO_BYTES)
        if not data:
            return ArrivalReport(total, first_len, first_t, last_t, fit.slope())
        last_t = time.monotonic()
        if total == 0:
            first_len, first_t = len(data), last_t
        total += len(data)
        fit.add(last_t - first_t, total)


class ProbeServer:
    """The far end of a checked link, on daemon threads. Use as a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0) -> None:
        self._timeout_s = timeout_s
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(0.2)  # so the accept loop notices stop() promptly
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name="probe", daemon=True)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def start(self) -> ProbeServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._sock.close()
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()

    def __enter__(self) -> ProbeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self._timeout_s)
            _nodelay(conn)
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                command = _recv_exact(conn, 1)
                if command == _ECHO:
                    self._echo(conn)
                elif command == _SINK:
                    conn.sendall(_receive_all(conn).pack())
                elif command == _SOURCE:
                    (n,) = _LENGTH.unpack(_recv_exact(conn, _LENGTH.size))
                    _send_zeros(conn, n)
                else:
                    logger.warning("probe: unknown command %r", command)
        except OSError as exc:
            logger.debug("probe connection ended: %s", exc)
        finally:
            with self._lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        while True:
            data = conn.recv(_IO_BYTES)
            if not data:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(data)


@dataclass(frozen=True)
class BulkResult:
    """One bulk transfer. ``steady_mbit`` is the arrival rate once data flows (what the
    link's rate cap governs); ``total_mbit`` counts from the first byte sent, so it also
    includes link latency."""

    nbytes: int
    steady_mbit: float
    total_mbit: float
    seconds: float


def _result(nbytes: int, report: ArrivalReport, t0: float) -> BulkResult:
    if report.nbytes != nbytes:
        raise ConnectionError(f"received {report.nbytes} of {nbytes} bytes")
    rate = report.rate
    if rate <= 0.0:  # too few reads to fit a line: fall back to first-to-last
        span = max(report.last_t - report.first_t, 1e-9)
        rate = (report.nbytes - report.first_read_bytes) / span
    seconds = report.last_t - t0
    return BulkResult(nbytes, rate * 8 / 1e6, nbytes * 8 / seconds / 1e6, seconds)


def connect(host: str, port: int, timeout_s: float = 30.0) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout_s)
    _nodelay(sock)
    return sock


def open_echo(host: str, port: int, timeout_s: float = 30.0) -> socket.socket:
    """A connection to the probe server in echo mode."""
    sock = connect(host, port, timeout_s)
    sock.sendall(_ECHO)
    return sock


def ping(sock: socket.socket, size: int = 64) -> float:
    """Send ``size`` bytes over an echo connection; return the round trip in ms."""
    payload = b"p" * size
    t0 = time.monotonic()
    sock.sendall(payload)
    _recv_exact(sock, size)
    return (time.monotonic() - t0) * 1e3


def measure_rtt(
    host: str, port: int, count: int, size: int = 64, timeout_s: float = 30.0
) -> list[float]:
    """Round trips (ms) of ``count`` small messages sent one after another."""
    with open_echo(host, port, timeout_s) as sock:
        return [ping(sock, size) for _ in range(count)]


def bulk_up(host: str, port: int, nbytes: int, timeout_s: float = 60.0) -> BulkResult:
    """Send ``nbytes`` from the client to the server."""
    with connect(host, port, timeout_s) as sock:
        t0 = time.monotonic()
        sock.sendall(_SINK)
        _send_zeros(sock, nbytes)
        sock.shutdown(socket.SHUT_WR)
        report = ArrivalReport.unpack(_recv_exact(sock, _REPORT.size))
    return _result(nbytes, report, t0)


def bulk_down(host: str, port: int, nbytes: int, timeout_s: float = 60.0) -> BulkResult:
    """Have the server send ``nbytes`` to the client (the request's trip is in ``total``)."""
    with connect(host, port, timeout_s) as sock:
        t0 = time.monotonic()
        sock.sendall(_SOURCE + _LENGTH.pack(nbytes))
        report = _receive_all(sock)
    return _result(nbytes, report, t0)


def _serve_forever(argv: list[str] | None = None) -> int:
    """``python -m molink.netem.probe``: a probe server in its own process, until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m molink.netem.probe")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with ProbeServer(args.host, args.port) as server:
        if args.port_file is not None:
            tmp = args.port_file.with_name(args.port_file.name + ".tmp")
            tmp.write_text(f"{server.port}\n")
            tmp.replace(args.port_file)
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(_serve_forever())
