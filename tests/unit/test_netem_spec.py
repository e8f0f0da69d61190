"""LinkSpec parsing, validation and the sizes derived from it."""

from __future__ import annotations

import math

import pytest

from molink.errors import InvalidParameterError
from molink.netem import LinkSpec, parse_hostport


@pytest.mark.parametrize(
    ("text", "rate_mbit", "one_way_ms"),
    [
        ("100mbit/30ms-rtt", 100.0, 15.0),
        ("20mbit/25ms", 20.0, 25.0),
        ("20Mbit/25ms-oneway", 20.0, 25.0),
        ("1gbit/5ms-rtt", 1000.0, 2.5),
        ("500kbit/100us", 0.5, 0.1),
        ("100 mbit / 0.02s rtt", 100.0, 10.0),
        ("inf/10ms", math.inf, 10.0),
    ],
)
def test_parse(text: str, rate_mbit: float, one_way_ms: float) -> None:
    spec = LinkSpec.parse(text)
    assert spec.rate_mbit == pytest.approx(rate_mbit)
    assert spec.one_way_delay_ms == pytest.approx(one_way_ms)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "100mbit",
        "fast/10ms",
        "100mbit/10",
        "100mbit/10ms-bogus",
        # Dots that make no number: a clear error, not float()'s ValueError.
        "1.2.3mbit/5ms",
        "100mbit/1.2.3ms",
        ".mbit/5ms",
        "100mbit/.ms",
    ],
)
def test_parse_rejects_garbage(text: str) -> None:
    with pytest.raises(InvalidParameterError):
        LinkSpec.parse(text)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rate_mbit": 0.0, "one_way_delay_ms": 1.0}, "rate_mbit"),
        ({"rate_mbit": -5.0, "one_way_delay_ms": 1.0}, "rate_mbit"),
        ({"rate_mbit": math.nan, "one_way_delay_ms": 1.0}, "rate_mbit"),
        ({"rate_mbit": 10.0, "one_way_delay_ms": -1.0}, "one_way_delay_ms"),
        ({"rate_mbit": 10.0, "one_way_delay_ms": math.inf}, "one_way_delay_ms"),
        ({"rate_mbit": 10.0, "one_way_delay_ms": 1.0, "queue_ms": 0.0}, "queue_ms"),
    ],
)
def test_validation_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(InvalidParameterError) as info:
        LinkSpec(**kwargs)
    assert info.value.field == field


def test_from_rtt_halves_the_round_trip() -> None:
    assert LinkSpec.from_rtt(100, 30) == LinkSpec(100, 15)


def test_units() -> None:
    spec = LinkSpec(100, 20)
    assert spec.bytes_per_s == pytest.approx(12.5e6)
    assert spec.delay_s == pytest.approx(0.020)
    assert spec.serialization_s(12_500) == pytest.approx(0.001)
    assert LinkSpec(math.inf, 1).serialization_s(10**9) == 0.0


@pytest.mark.parametrize(
    ("rate_mbit", "chunk"),
    [(100, 25_000), (20, 5_000), (1000, 250_000), (1, 4 * 1024), (math.inf, 256 * 1024)],
)
def test_chunk_is_about_two_ms_of_wire_time(rate_mbit: float, chunk: int) -> None:
    assert LinkSpec(rate_mbit, 1).chunk_bytes == chunk


@pytest.mark.parametrize("text", ["100mbit/20ms", "20mbit/25ms", "1gbit/2.5ms", "inf/5ms"])
def test_buffer_limit_covers_bandwidth_delay_product(text: str) -> None:
    spec = LinkSpec.parse(text)
    if not spec.unlimited:
        bdp = spec.bytes_per_s * (spec.delay_s + spec.queue_s)
        assert spec.buffer_limit_bytes > bdp
    assert spec.buffer_limit_bytes < 64 * 1024 * 1024


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:8000") == ("127.0.0.1", 8000)
    assert parse_hostport("localhost:0") == ("localhost", 0)
    assert parse_hostport("[::1]:9") == ("::1", 9)
    for bad in ("127.0.0.1", ":80", "host:port", "h:70000"):
        with pytest.raises(InvalidParameterError):
            parse_hostport(bad)
