"""The link estimator on synthetic transfers: a bottleneck of known rate behind a fixed
round trip, with jitter, delayed acknowledgements and messages queued behind others."""

from __future__ import annotations

import math
import random

import pytest

from molink.pipeline.link_estimator import LinkEstimator, quantile

RATE = 50e6 / 8  # 50 Mbit/s in bytes per second
RTT = 0.020
TOLERANCE = 0.10


def _small(rng: random.Random) -> int:
    return rng.randint(500, 8_000)  # decode steps, results


def _large(rng: random.Random) -> int:
    return rng.randint(50_000, 2_000_000)  # prefill chunks


def _assert_close(estimator: LinkEstimator, rate: float, rtt: float) -> None:
    estimate = estimator.estimate()
    assert abs(estimate.bandwidth_bytes_per_s - rate) <= TOLERANCE * rate, estimate
    assert abs(estimate.rtt_s - rtt) <= TOLERANCE * rtt, estimate


@pytest.mark.parametrize("seed", range(5))
def test_recovers_rate_and_round_trip_despite_delayed_acks(seed: int) -> None:
    rng = random.Random(seed)
    estimator = LinkEstimator()
    for _ in range(400):
        size = _large(rng) if rng.random() < 0.25 else _small(rng)
        elapsed = RTT + size / RATE + rng.uniform(0, 0.001)
        if rng.random() < 0.3:  # a busy receiver or CPU: only ever later
            elapsed += rng.uniform(0.003, 0.2)
        estimator.add(size, elapsed)
    _assert_close(estimator, RATE, RTT)


def _simulate(
    estimator: LinkEstimator,
    rng: random.Random,
    rate: float,
    rtt: float,
    bursts: int,
    start: float = 0.0,
    stagger: float = 0.02,
) -> float:
    """Bursts of messages through one bottleneck, sent up to ``stagger`` apart (as
    micro-batches finish), each waiting for the ones before it. With no stagger, a burst
    goes out at once, before the previous one was acknowledged. Returns when the link was
    free again."""
    now = link_free_at = last_ack = start
    for _ in range(bursts):
        now = (max(now, last_ack) if stagger else now) + rng.uniform(0.0, 0.2)
        sizes = [_small(rng) for _ in range(3)] + [_large(rng) for _ in range(rng.randint(0, 4))]
        rng.shuffle(sizes)
        for size in sizes:
            now += rng.uniform(0.0, stagger)
            link_free_at = max(now, link_free_at) + size / rate
            delay = rng.uniform(0.002, 0.03) if rng.random() < 0.1 else 0.0
            acked_at = max(last_ack, link_free_at + rtt + rng.uniform(0, 0.0005) + delay)
            estimator.observe(size, now, acked_at)
            last_ack = acked_at
    return last_ack


@pytest.mark.parametrize("stagger", [0.0, 0.02])
@pytest.mark.parametrize("seed", range(5))
def test_messages_queued_behind_others_do_not_look_like_a_slow_link(
    seed: int, stagger: float
) -> None:
    rng = random.Random(seed)
    estimator = LinkEstimator()
    _simulate(estimator, rng, RATE, RTT, bursts=80, stagger=stagger)
    _assert_close(estimator, RATE, RTT)


def test_send_to_ack_times_alone_would_be_far_off() -> None:
    """The queueing correction is what makes the previous test pass."""
    rng = random.Random(3)
    naive = LinkEstimator()
    recorder = _Recorder()
    _simulate(recorder, rng, RATE, RTT, bursts=80, stagger=0.0)
    for size, sent_at, acked_at in recorder.samples:
        naive.add(size, acked_at - sent_at, acked_at)
    estimate = naive.estimate()
    assert estimate.bandwidth_bytes_per_s < 0.7 * RATE or estimate.rtt_s > 1.5 * RTT


class _Recorder:
    def __init__(self) -> None:
        self.samples: list[tuple[int, float, float]] = []

    def observe(self, num_bytes: int, sent_at: float, acked_at: float) -> None:
        self.samples.append((num_bytes, sent_at, acked_at))


def test_follows_a_link_that_slows_down() -> None:
    rng = random.Random(1)
    estimator = LinkEstimator(max_age_s=10.0)
    end = _simulate(estimator, rng, RATE, RTT, bursts=60)
    _simulate(estimator, rng, RATE / 5, 3 * RTT, bursts=100, start=end)
    _assert_close(estimator, RATE / 5, 3 * RTT)


def test_small_messages_pin_the_round_trip_but_never_the_rate() -> None:
    rng = random.Random(2)
    estimator = LinkEstimator()
    for _ in range(200):
        late = rng.uniform(0.005, 0.05) if rng.random() < 0.3 else 0.0
        estimator.add(_small(rng), RTT + rng.uniform(0, 0.001) + late)
    estimate = estimator.estimate()
    assert math.isinf(estimate.bandwidth_bytes_per_s)
    assert abs(estimate.rtt_s - RTT) <= TOLERANCE * RTT
    assert estimate.samples == 200


def test_rate_survives_a_long_run_of_decode_steps() -> None:
    rng = random.Random(4)
    estimator = LinkEstimator()
    for _ in range(40):
        size = _large(rng)
        estimator.add(size, RTT + size / RATE)
    for _ in range(500):
        estimator.add(_small(rng), RTT + rng.uniform(0, 0.001))
    _assert_close(estimator, RATE, RTT)


def test_nothing_measured_yet() -> None:
    estimate = LinkEstimator("a->b").estimate()
    assert (estimate.hop, estimate.rtt_s, estimate.samples) == ("a->b", 0.0, 0)
    assert math.isinf(estimate.bandwidth_bytes_per_s)


def test_only_large_messages_still_give_a_rate() -> None:
    rng = random.Random(5)
    estimator = LinkEstimator()
    for _ in range(100):
        size = _large(rng)
        estimator.add(size, RTT + size / RATE + rng.uniform(0, 0.001))
    estimate = estimator.estimate()
    assert abs(estimate.bandwidth_bytes_per_s - RATE) <= 0.25 * RATE, estimate


def test_quantile_interpolates() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([1.0, 2.0], 0.25) == 1.25
    assert quantile([7.0], 0.9) == 7.0
