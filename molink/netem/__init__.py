"""Link emulation: a TCP proxy that adds delay and a rate cap, for tests and benchmarks."""

from molink.netem.emulator import LinkEmulator
from molink.netem.proxy import LinkProxy, LinkStats
from molink.netem.shaper import DelayLine, Delivery, RateClock
from molink.netem.spec import LinkSpec, parse_hostport

__all__ = [
    "DelayLine",
    "Delivery",
    "LinkEmulator",
    "LinkProxy",
    "LinkSpec",
    "LinkStats",
    "RateClock",
    "parse_hostport",
]
