"""Transmission scheduling: the prefill budget from link and stage measurements."""

from __future__ import annotations

import dataclasses
import math

import pytest

from molink.cli.args import EngineArgs
from molink.engine.transmission import (
    TransmissionConfig,
    TransmissionScheduler,
    decode_round_trip_s,
    prefill_allowance,
    prefill_token_budget,
    prefill_tokens_of,
    slowest_seconds_per_token,
)
from molink.errors import InvalidParameterError
from molink.step import ScheduledSequence, StepPlan
from tests.unit.test_transmission_fakes import (
    MB_PER_S,
    FakeClock,
    FakeTelemetry,
    link,
    timing,
    two_stage_telemetry,
)


def allowance_of(telemetry: FakeTelemetry, alpha: float = 1.0) -> int | None:
    scheduler = TransmissionScheduler(TransmissionConfig(alpha=alpha), telemetry, FakeClock())
    return scheduler.refresh()


# -- the allowance -------------------------------------------------------------------------


def test_allowance_is_alpha_round_trips_of_the_slowest_link():
    # R = 0.01 + 0.01 + (0.02 + 0.02) / 2 = 0.04 s; a token takes 1000 B / 1 MB/s = 1 ms.
    assert allowance_of(two_stage_telemetry()) == 40
    assert allowance_of(two_stage_telemetry(), alpha=0.5) == 20


def test_allowance_scales_with_bandwidth():
    slow = allowance_of(two_stage_telemetry(bandwidth=MB_PER_S))
    fast = allowance_of(two_stage_telemetry(bandwidth=10 * MB_PER_S))
    assert fast == 10 * slow
    wide = allowance_of(two_stage_telemetry(bytes_per_token=4000))
    assert wide == slow // 4


def test_allowance_scales_with_decode_time():
    base = allowance_of(two_stage_telemetry(compute_s=(0.01, 0.01)))
    slow_compute = allowance_of(two_stage_telemetry(compute_s=(0.05, 0.05)))
    far = allowance_of(two_stage_telemetry(rtt_s=0.1))
    assert base == 40 and slow_compute == 120 and far == 120


def test_slowest_activation_hop_decides_and_the_return_hop_is_ignored():
    links = [
        link("head->s1", 8 * MB_PER_S, 0.01),
        link("s1->s2", 2 * MB_PER_S, 0.01),
        link("s2->head", 0.001, 0.01),  # carries only sampled tokens
    ]
    assert slowest_seconds_per_token(links, 1000) == pytest.approx(1000 / (2 * MB_PER_S))
    assert decode_round_trip_s(links, [timing("h", 0.02), timing("s1", 0.0, samples=0)]) == (
        pytest.approx(0.02 + 0.015)
    )


def test_compute_per_token_does_not_cap_an_unshaped_link():
    telemetry = two_stage_telemetry(bandwidth=math.inf)
    telemetry.timings[0] = timing("head", 0.01, per_token=0.002)
    assert allowance_of(telemetry) is None


def test_round_trip_uses_decode_only_steps_once_timed():
    links = [link("head->s1", MB_PER_S, 0.0), link("s1->head", math.inf, 0.0)]
    mixed = timing("h", 0.5)
    assert decode_round_trip_s(links, [mixed]) == pytest.approx(0.5)
    decode_timed = dataclasses.replace(mixed, compute_s_per_decode_step=0.05)
    assert decode_round_trip_s(links, [decode_timed]) == pytest.approx(0.05)


def test_no_measured_bandwidth_means_no_cap():
    unmeasured = two_stage_telemetry(bandwidth=math.inf)
    assert allowance_of(unmeasured) is None
    assert allowance_of(two_stage_telemetry(bytes_per_token=0)) is None
    assert allowance_of(FakeTelemetry()) is None  # no hops at all
    assert slowest_seconds_per_token([link("head->s1", 0.0)], 1000) is None


def test_prefill_allowance_floors():
    assert prefill_allowance(0.04, 0.001, 1.0) == 40
    assert prefill_allowance(0.0395, 0.001, 1.0) == 39


# -- the per-plan rule ---------------------------------------------------------------------


def budget(allowance=40, in_flight=0, waited=0.0, aging=2.0, floor=16, token_budget=512):
    return prefill_token_budget(allowance, in_flight, waited, aging, floor, token_budget)


def test_budget_subtracts_prefill_in_flight_down_to_the_floor():
    assert budget() == 40
    assert budget(in_flight=30) == 16  # one block at least
    assert budget(in_flight=10) == 30
    assert budget(allowance=3) == 16  # a slow link still moves a block per plan
    assert budget(floor=16, token_budget=8) == 8


def test_aging_grows_the_share_of_a_prefill_that_waited():
    assert budget(waited=1.0) == 60  # half an aging period: one and a half shares
    assert budget(waited=2.0) == 80
    assert budget(waited=20.0) == 440
    assert budget(waited=200.0) == 512  # never beyond the token budget
    assert budget(waited=-5.0) == 40  # clock skew does not shrink it


def test_prefill_tokens_of_a_plan_count_chunks_longer_than_one():
    scheduled = (
        ScheduledSequence(1, 10, 1),
        ScheduledSequence(2, 0, 24),
        ScheduledSequence(3, 3, 5),
    )
    plan = StepPlan(0, scheduled, tuple(range(30)))
    assert prefill_tokens_of(plan) == 29


# -- the stateful scheduler ----------------------------------------------------------------


def test_off_mode_and_missing_telemetry_mean_no_cap():
    telemetry = two_stage_telemetry()
    off = TransmissionScheduler(TransmissionConfig(enabled=False), telemetry, FakeClock())
    assert off.refresh() is None and off.budget(0, None, 16, 512) is None
    assert telemetry.reads == 0
    alone = TransmissionScheduler(TransmissionConfig(), None, FakeClock())
    assert alone.refresh() is None and alone.budget(0, None, 16, 512) is None


def test_budget_ages_with_the_time_the_prefill_has_been_in_progress():
    clock = FakeClock(100.0)
    scheduler = TransmissionScheduler(TransmissionConfig(), two_stage_telemetry(), clock)
    scheduler.refresh()
    assert scheduler.budget(0, prefill_started_at=None, floor_tokens=16, token_budget=512) == 40
    assert scheduler.budget(0, prefill_started_at=100.0, floor_tokens=16, token_budget=512) == 40
    clock.now = 104.0
    assert scheduler.budget(0, prefill_started_at=100.0, floor_tokens=16, token_budget=512) == 120
    assert scheduler.budget(0, prefill_started_at=None, floor_tokens=16, token_budget=512) == 40


def test_refresh_is_throttled_and_follows_new_measurements():
    clock = FakeClock()
    telemetry = two_stage_telemetry()
    scheduler = TransmissionScheduler(TransmissionConfig(refresh_s=1.0), telemetry, clock)
    assert scheduler.refresh() == 40
    telemetry.links[0] = link("head->s1", 2 * MB_PER_S, 0.02)
    assert scheduler.refresh() == 40 and telemetry.reads == 1
    clock.now += 1.0
    assert scheduler.refresh() == 80
    telemetry.links[0] = link("head->s1", 4 * MB_PER_S, 0.02)
    assert scheduler.refresh(force=True) == 160


def test_a_failing_telemetry_keeps_the_last_estimate(caplog):
    telemetry = two_stage_telemetry()
    scheduler = TransmissionScheduler(TransmissionConfig(refresh_s=0), telemetry, FakeClock())
    assert scheduler.refresh() == 40
    telemetry.fail = True
    assert scheduler.refresh() == 40
    assert "telemetry failed" in caplog.text


@pytest.mark.parametrize(
    "config, field",
    [
        (TransmissionConfig(alpha=0), "transmission.alpha"),
        (TransmissionConfig(aging_s=0), "transmission.aging_s"),
        (TransmissionConfig(refresh_s=-1), "transmission.refresh_s"),
    ],
)
def test_bad_config_is_rejected_by_name(config, field):
    with pytest.raises(InvalidParameterError) as info:
        TransmissionScheduler(config, None)
    assert info.value.field == field


def test_the_flag_selects_the_mode():
    assert EngineArgs().molink_transmission_scheduling == "on"
    assert EngineArgs(molink_transmission_scheduling="off").molink_transmission_scheduling == "off"
    with pytest.raises(InvalidParameterError) as info:
        EngineArgs(molink_transmission_scheduling="maybe")
    assert info.value.field == "molink_transmission_scheduling"
