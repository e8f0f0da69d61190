"""Per-peer bounds: token buckets for calls, counters for streams."""

from __future__ import annotations

import logging

import pytest

from molink.security.limits import LimitExceededError, RateLimiter, RefusalLog, StreamLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_allows_a_burst_then_one_per_interval_per_peer() -> None:
    clock = Clock()
    limiter = RateLimiter("joins", burst=2, interval_s=1.0, node_burst=100, clock=clock)
    limiter.check("a")
    limiter.check("a")
    with pytest.raises(LimitExceededError, match="too many joins from node a"):
        limiter.check("a")
    limiter.check("b")  # another peer has its own bucket
    clock.now += 1.0
    limiter.check("a")
    with pytest.raises(LimitExceededError):
        limiter.check("a")


def test_rate_limiter_bounds_the_node_across_peers() -> None:
    clock = Clock()
    limiter = RateLimiter("joins", burst=5, interval_s=2.0, node_burst=3, clock=clock)
    for peer in ("a", "b", "c"):
        limiter.check(peer)
    with pytest.raises(LimitExceededError, match="too many joins on this node"):
        limiter.check("d")
    clock.now += 2.0
    limiter.check("d")
    limiter_open = RateLimiter("joins", burst=1, interval_s=1.0, node_burst=2, clock=clock)
    limiter_open.check(None)
    limiter_open.check(None)  # an unauthenticated caller counts only against the node
    with pytest.raises(LimitExceededError):
        limiter_open.check(None)


def test_stream_limiter_counts_streams_per_peer() -> None:
    limiter = StreamLimiter(per_peer=2, per_node=100)
    with limiter.hold("a"), limiter.hold("a"):
        with pytest.raises(LimitExceededError, match="already holds 2 streams"):
            limiter.acquire("a")
        with limiter.hold("b"), limiter.hold(None), limiter.hold(None), limiter.hold(None):
            assert limiter.held("b") == 1
        assert limiter.held("a") == 2
    assert limiter.held("a") == 0
    limiter.acquire("a")
    limiter.release("a")


def test_stream_limiter_bounds_the_node_whatever_identities_callers_present() -> None:
    """Any member can mint fresh identities, each with its own per-peer allowance: the
    node-wide bound holds across all of them, and unauthenticated callers count too."""
    limiter = StreamLimiter(per_peer=2, per_node=5)
    for peer in ("minted-1", "minted-2", "minted-3", None):
        limiter.acquire(peer)
    limiter.acquire("minted-1")
    for peer in ("minted-4", "minted-2", None):
        with pytest.raises(LimitExceededError, match="already holds 5 streams of its peers"):
            limiter.acquire(peer)
    assert limiter.total() == 5 and limiter.held("minted-4") == 0
    limiter.release(None)
    limiter.acquire("minted-4")  # room again once one is released
    assert limiter.total() == 5


def test_refusals_are_logged_without_flooding(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = RefusalLog(logging.getLogger("refusals"), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="refusals"):
        for _ in range(50):
            log.refused("a", "refused a")
        log.refused("b", "refused b")
        clock.now += 10.0
        log.refused("a", "refused a again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused a",
        "refused b",
        "refused a again (49 more refused since the last line)",
    ]
