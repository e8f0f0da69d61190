"""Link descriptions: rate and one-way delay of one direction of an emulated link."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from molink.errors import InvalidParameterError

# Bounds on a read from a socket, expressed as time on the wire: a chunk is the unit the
# rate clock schedules, so it must be small enough that one bulk transfer cannot hold the
# link for long, and large enough that a fast link is not drowned in per-chunk overhead.
_CHUNK_TIME_S = 0.002
_MIN_CHUNK_BYTES = 4 * 1024
_MAX_CHUNK_BYTES = 256 * 1024
# An unlimited link still needs a cap on what one connection may hold in memory.
_UNLIMITED_BUFFER_BYTES = 8 * 1024 * 1024

_RATE_UNITS = {"bit": 1e-6, "kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}
_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"  # 20, 2.5, 2., .5: what float() takes, not "1.2.3"
_SPEC_RE = re.compile(
    rf"^\s*(?P<rate>{_NUMBER}|inf)\s*(?P<runit>[kmg]?bit)?\s*/\s*"
    rf"(?P<delay>{_NUMBER})\s*(?P<dunit>us|ms|s)\s*(?P<kind>-?(rtt|one-?way|ow))?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a link: a bottleneck of ``rate_mbit`` followed by a fixed delay.

    ``rate_mbit`` is in units of 10^6 bit/s; ``math.inf`` means no rate cap.
    ``queue_ms`` bounds how far ahead of the wire the emulator reads from a sender (the
    bottleneck queue); past it the sender is held back by TCP flow control.
    """

    rate_mbit: float
    one_way_delay_ms: float
    queue_ms: float = 10.0

    def __post_init__(self) -> None:
        if not (self.rate_mbit > 0):
            raise InvalidParameterError("rate_mbit", f"must be > 0, got {self.rate_mbit}")
        if not (0 <= self.one_way_delay_ms < math.inf):
            raise InvalidParameterError(
                "one_way_delay_ms", f"must be finite and >= 0, got {self.one_way_delay_ms}"
            )
        if not (0 < self.queue_ms < math.inf):
            raise InvalidParameterError("queue_ms", f"must be finite and > 0, got {self.queue_ms}")

    @classmethod
    def from_rtt(cls, rate_mbit: float, rtt_ms: float, queue_ms: float = 10.0) -> LinkSpec:
        """A direction of a symmetric link whose round trip is ``rtt_ms``."""
        return cls(rate_mbit=rate_mbit, one_way_delay_ms=rtt_ms / 2.0, queue_ms=queue_ms)

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        """Parse ``"100mbit/30ms-rtt"``, ``"20mbit/25ms"`` (one way) or ``"1gbit/5ms-rtt"``."""
        m = _SPEC_RE.match(text)
        if m is None:
            raise InvalidParameterError(
                "link", f"cannot parse {text!r}; expected e.g. '100mbit/30ms-rtt' or '20mbit/25ms'"
            )
        rate = float(m["rate"]) * _RATE_UNITS[(m["runit"] or "mbit").lower()]
        delay_ms = float(m["delay"]) * _TIME_UNITS[m["dunit"].lower()]
        if (m["kind"] or "").lower().lstrip("-") == "rtt":
            delay_ms /= 2.0
        return cls(rate_mbit=rate, one_way_delay_ms=delay_ms)

    @property
    def unlimited(self) -> bool:
        return math.isinf(self.rate_mbit)

    @property
    def bytes_per_s(self) -> float:
        return self.rate_mbit * 1e6 / 8.0

    @property
    def delay_s(self) -> float:
        return self.one_way_delay_ms / 1e3

    @property
    def queue_s(self) -> float:
        return self.queue_ms / 1e3

    def serialization_s(self, nbytes: int) -> float:
        """Time ``nbytes`` occupy the bottleneck."""
        return 0.0 if self.unlimited else nbytes / self.bytes_per_s

    @property
    def chunk_bytes(self) -> int:
        """Largest read scheduled as one unit (about 2 ms of wire time, clamped)."""
        if self.unlimited:
            return _MAX_CHUNK_BYTES
        return int(min(_MAX_CHUNK_BYTES, max(_MIN_CHUNK_BYTES, self.bytes_per_s * _CHUNK_TIME_S)))

    @property
    def buffer_limit_bytes(self) -> int:
        """Most bytes one connection may hold in this direction.

        Must exceed the bandwidth-delay product plus the queue, or the cap, not the rate
        clock, would limit throughput; it only binds when the receiver stops reading.
        """
        if self.unlimited:
            return _UNLIMITED_BUFFER_BYTES
        in_flight = self.bytes_per_s * (self.delay_s + self.queue_s)
        return int(in_flight) + 4 * self.chunk_bytes

    def describe(self) -> str:
        rate = "unlimited" if self.unlimited else f"{self.rate_mbit:g} Mbit/s"
        return f"{rate}, {self.one_way_delay_ms:g} ms one way"


def parse_hostport(text: str) -> tuple[str, int]:
    """Split ``"127.0.0.1:8000"`` into host and port (port 0 allowed: pick a free one)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidParameterError("address", f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)
