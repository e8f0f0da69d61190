"""Adaptive micro-batching: K covers the pipeline bubble, with hysteresis and pinning."""

from __future__ import annotations

import math

import pytest

from molink.engine.microbatch_controller import (
    MicroBatchController,
    MicroBatchPolicy,
    PipelineModel,
    balanced_decode_cap,
    covering_micro_batches,
    pipeline_model,
)
from molink.errors import InvalidParameterError
from tests.unit.test_transmission_fakes import (
    MB_PER_S,
    FakeClock,
    FakeTelemetry,
    link,
    timing,
    two_stage_telemetry,
)

FAST = MicroBatchPolicy(patience=1, interval_s=0.0)


def fixed_model(stage_s: list[float], latency_s: float) -> PipelineModel:
    return PipelineModel(tuple(stage_s), (0.0,) * len(stage_s), (), latency_s)


def controller(
    telemetry: FakeTelemetry | None, policy: MicroBatchPolicy = FAST, pinned: int = 0
) -> tuple[MicroBatchController, FakeClock]:
    clock = FakeClock()
    ctl = MicroBatchController(telemetry, pinned=pinned, policy=policy, clock=clock)
    ctl.reset(num_stages=2)
    return ctl, clock


# -- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stage_s, latency_s",
    [([0.01, 0.01], 0.0), ([0.01, 0.01], 0.03), ([0.05, 0.01], 0.03), ([0.01, 0.02, 0.01], 0.2)],
)
def test_with_fixed_step_times_k_is_the_round_trip_over_the_slowest_stage(stage_s, latency_s):
    expected = math.ceil((sum(stage_s) + latency_s) / max(stage_s) - 1e-9)
    assert covering_micro_batches(fixed_model(stage_s, latency_s), 0.0, 50) == expected


def test_k_rises_with_the_round_trip_and_falls_when_compute_dominates():
    ks = [
        covering_micro_batches(fixed_model([0.02, 0.02], rtt / 2 * 2), 0.0, 50)
        for rtt in (0.005, 0.03, 0.1, 0.3)
    ]
    assert ks == sorted(ks) and ks[0] == 3 and ks[-1] == 17
    dominated = [
        covering_micro_batches(fixed_model([c, 0.01], 0.03), 0.0, 50) for c in (0.01, 0.1, 1.0)
    ]
    assert dominated == [5, 2, 2]


def test_k_is_clamped_to_stages_plus_four():
    ctl, _ = controller(two_stage_telemetry(rtt_s=5.0))
    assert ctl.update(None) == 6
    cold, _ = controller(two_stage_telemetry(rtt_s=0.0, compute_s=(1.0, 0.0)))
    assert cold.update(None) == 3  # the floor: stages + 1, even when one stage dominates


def test_a_slow_link_is_a_stage_of_the_pipeline():
    telemetry = two_stage_telemetry(bandwidth=MB_PER_S, rtt_s=0.02, compute_s=(0.01, 0.01))
    model = pipeline_model(telemetry.links, telemetry.timings, 1000, tokens_per_plan=20.0)
    assert model.hop_per_token_s == (pytest.approx(0.001),)  # the return hop carries no activations
    assert model.bottleneck_s(20.0) == pytest.approx(0.02)  # the link, not a stage
    assert model.round_trip_s(20.0) == pytest.approx(0.01 + 0.02 + 0.01 + 0.02)
    # 40 tokens per round trip: the link's transfer time lengthens the bubble (4 -> 5).
    assert covering_micro_batches(model, load_tokens=40.0, max_k=10) == 5
    unlimited = pipeline_model(
        two_stage_telemetry(bandwidth=math.inf).links, telemetry.timings, 1000, 20.0
    )
    assert covering_micro_batches(unlimited, load_tokens=40.0, max_k=10) == 4


def test_step_time_splits_into_fixed_and_per_token_parts():
    timings = [timing("head", 0.012, per_token=0.0001), timing("s1", 0.02, per_token=0.001)]
    model = pipeline_model([link("a"), link("b")], timings, 1000, tokens_per_plan=10.0)
    assert model.stage_fixed_s == pytest.approx((0.011, 0.01))
    assert model.round_trip_s(20.0) == pytest.approx(0.011 + 0.002 + 0.01 + 0.02)


def test_more_micro_batches_stop_helping_once_the_bubble_is_covered():
    # per-token work splits across plans, a fixed part per step does not: K is bounded.
    timings = [timing("head", 0.03, per_token=0.0005), timing("s1", 0.03, per_token=0.0005)]
    links = [link("head->s1", rtt_s=0.03), link("s1->head", rtt_s=0.03)]
    model = pipeline_model(links, timings, 1000, tokens_per_plan=20.0)
    assert covering_micro_batches(model, load_tokens=60.0, max_k=20) == 3


def test_unmeasured_pipelines_give_no_model():
    assert pipeline_model([], [], 1000, None) is None
    assert (
        pipeline_model([], [timing("head", 0.01), timing("s1", 0.0, samples=0)], 1000, None) is None
    )
    assert pipeline_model([], [timing("head", 0.0)], 1000, None) is None


def test_balanced_decode_cap():
    assert balanced_decode_cap(40, 1) is None
    assert balanced_decode_cap(40, 3) == 14
    assert balanced_decode_cap(0, 4) == 1
    assert balanced_decode_cap(2, 5) == 1


# -- the controller ------------------------------------------------------------------------


def test_starts_at_stages_plus_one_and_stays_without_measurements():
    ctl, _ = controller(FakeTelemetry())
    assert ctl.current == 3 and ctl.update(None) == 3
    alone, _ = controller(None)
    assert alone.update(None) == 3


def test_pinned_k_never_moves():
    ctl, _ = controller(two_stage_telemetry(rtt_s=1.0), pinned=2)
    assert ctl.reset(num_stages=4) == 2
    assert ctl.update(None) == 2


def test_k_follows_a_growing_round_trip():
    telemetry = two_stage_telemetry(rtt_s=0.01, compute_s=(0.02, 0.02))  # needs 2.5
    ctl, _ = controller(telemetry)
    assert ctl.update(None) == 3
    telemetry.links = two_stage_telemetry(rtt_s=0.05).links  # needs 4.5
    assert ctl.update(None) == 5
    telemetry.timings = [timing("head", 0.2), timing("s1", 0.02)]  # compute dominates
    assert ctl.update(None) == 3  # back down, but never below stages + 1


def test_hysteresis_needs_patience_and_ignores_flapping():
    telemetry = two_stage_telemetry(rtt_s=0.06, compute_s=(0.02, 0.02))
    wants_five = telemetry.timings
    wants_two = [timing("head", 0.2), timing("s1", 0.0)]
    ctl, clock = controller(telemetry, MicroBatchPolicy(patience=3, interval_s=0.5))
    assert ctl.update(None) == 3
    assert ctl.update(None) == 3  # too soon: not even evaluated
    clock.now += 0.5
    assert ctl.update(None) == 3
    for timings in (wants_two, wants_five, wants_two, wants_five):
        telemetry.timings = timings
        clock.now += 0.5
        assert ctl.update(None) == 3  # the proposals change side each time
    for _ in range(2):
        clock.now += 0.5
        ctl.update(None)
    assert ctl.current == 5


def test_dead_band_keeps_k_when_the_bubble_is_nearly_covered():
    # fill(4) = 4 * 0.02 / (0.04 + 0.046) = 0.93: inside a 0.15 band, K = 4 stays.
    telemetry = two_stage_telemetry(rtt_s=0.046, compute_s=(0.02, 0.02))
    ctl, _ = controller(telemetry)
    ctl.current = 4
    assert ctl.update(None) == 4
    tight, _ = controller(telemetry, MicroBatchPolicy(patience=1, interval_s=0.0, dead_band=0.0))
    tight.current = 4
    assert tight.update(None) == 5


def test_k_below_the_floor_goes_straight_back_to_it():
    telemetry = two_stage_telemetry(rtt_s=0.0, compute_s=(0.02, 0.02))  # K = 2 would do
    ctl, _ = controller(telemetry)
    ctl.current = 1
    assert ctl.update(None, num_running=40) == 3


def test_a_failing_telemetry_keeps_k(caplog):
    telemetry = two_stage_telemetry(rtt_s=0.5)
    telemetry.fail = True
    ctl, _ = controller(telemetry)
    assert ctl.update(None) == 3
    assert "telemetry failed" in caplog.text


@pytest.mark.parametrize(
    "policy, field",
    [
        (MicroBatchPolicy(max_extra=-1), "micro_batches.max_extra"),
        (MicroBatchPolicy(dead_band=1.0), "micro_batches.dead_band"),
        (MicroBatchPolicy(patience=0), "micro_batches.patience"),
    ],
)
def test_bad_policy_is_rejected_by_name(policy, field):
    with pytest.raises(InvalidParameterError) as info:
        MicroBatchController(None, policy=policy)
    assert info.value.field == field


def test_k_above_the_floor_never_exceeds_the_running_sequences_and_idles_unchanged():
    telemetry = two_stage_telemetry(rtt_s=1.0)  # wants the most
    ctl, _ = controller(telemetry)
    assert ctl.update(2.0, num_running=4) == 4
    assert ctl.update(2.0, num_running=0) == 4  # nothing runs: nothing learnt
    assert ctl.update(2.0, num_running=50) == 6
    assert ctl.update(1.0, num_running=1) == 3  # a lull does not go below stages + 1
