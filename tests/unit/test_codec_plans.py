"""Step plans and results through their proto mirrors, and plan validation."""

from __future__ import annotations

import dataclasses

import pytest

from molink.errors import ProtocolError
from molink.sampling_params import SamplingParams
from molink.step import (
    NewSequenceData,
    SampledToken,
    ScheduledSequence,
    StepPlan,
    StepResult,
    TokenLogprob,
)
from molink.transport.config import TransportConfig
from molink.transport.convert import (
    plan_from_proto,
    plan_to_proto,
    result_from_proto,
    result_to_proto,
    sampling_to_proto,
)
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import PlanLimits, check_known_sequences, validate_plan

FULL_PARAMS = SamplingParams(
    n=2,
    temperature=0.7,
    top_p=0.9,
    top_k=40,
    min_p=0.05,
    repetition_penalty=1.1,
    presence_penalty=-0.5,
    frequency_penalty=0.25,
    seed=-12345,
    stop=("\n\n", "END"),
    stop_token_ids=(2, 7),
    max_tokens=None,
    min_tokens=3,
    ignore_eos=True,
    logprobs=5,
    skip_special_tokens=False,
    include_stop_str_in_output=True,
    spaces_between_special_tokens=False,
    allowed_token_ids=(3, 9, 11),
    bad_words_token_ids=((5,), (6, 7, 8)),
)


def _plan(**overrides: object) -> StepPlan:
    plan = StepPlan(
        step_id=41,
        scheduled=(
            ScheduledSequence(
                seq_id=3, num_computed_tokens=0, num_new_tokens=4, new_block_ids=(0, 1), sample=True
            ),
            ScheduledSequence(seq_id=9, num_computed_tokens=17, num_new_tokens=1),
        ),
        token_ids=(11, 12, 13, 14, 15),
        new_sequences=(
            NewSequenceData(
                seq_id=3, token_ids=(11, 12, 13, 14), num_prompt_tokens=4, sampling=FULL_PARAMS
            ),
        ),
        finished_seq_ids=(5, 6),
        micro_batch=2,
    )
    return dataclasses.replace(plan, **overrides)


def _wire(plan: StepPlan, include_token_ids: bool = True) -> StepPlan:
    data = plan_to_proto(plan, include_token_ids).SerializeToString()
    return plan_from_proto(pb.StepPlan.FromString(data))


def test_plan_round_trip_equals_the_dataclass() -> None:
    assert _wire(_plan()) == _plan()


def test_default_sampling_params_round_trip() -> None:
    plan = _plan(new_sequences=(NewSequenceData(3, (1, 2), 2, SamplingParams(seed=0)),))
    assert _wire(plan) == plan


def test_forward_messages_leave_out_flat_token_ids() -> None:
    assert _wire(_plan(), include_token_ids=False) == _plan(token_ids=())


def test_result_round_trip_equals_the_dataclass() -> None:
    result = StepResult(
        step_id=8,
        micro_batch=1,
        sampled=(
            SampledToken(
                seq_id=3,
                token_id=99,
                logprob=-0.25,
                top_logprobs=(TokenLogprob(99, -0.25), TokenLogprob(4, -1.5)),
            ),
            SampledToken(seq_id=9, token_id=0),
        ),
    )
    wire = pb.StepResult.FromString(result_to_proto(result).SerializeToString())
    assert result_from_proto(wire) == result
    failed = StepResult(step_id=8, micro_batch=1, error="stage s1 failed")
    assert result_from_proto(result_to_proto(failed)) == failed


def test_invalid_sampling_params_on_the_wire_are_a_protocol_error() -> None:
    msg = plan_to_proto(_plan())
    msg.new_sequences[0].sampling.top_p = 3.0
    with pytest.raises(ProtocolError, match="top_p"):
        plan_from_proto(msg)
    msg.new_sequences[0].ClearField("sampling")  # n = 0
    with pytest.raises(ProtocolError, match="invalid sampling parameters"):
        plan_from_proto(msg)


def test_optional_sampling_fields_keep_none_and_zero_apart() -> None:
    msg = sampling_to_proto(SamplingParams(seed=0, logprobs=0, max_tokens=None))
    assert msg.HasField("seed") and msg.HasField("logprobs") and not msg.HasField("max_tokens")


LIMITS = PlanLimits.from_config(
    TransportConfig(max_seqs_per_step=4, max_tokens_per_step=64), vocab_size=100, num_kv_blocks=8
)


def test_a_good_plan_passes() -> None:
    validate_plan(_plan(), LIMITS)
    validate_plan(_plan(token_ids=()), LIMITS)  # as later stages receive it


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"token_ids": (1, 2)}, "2 token ids for 5 scheduled tokens"),
        ({"token_ids": (1, 2, 3, 4, 100)}, r"token id 100 is outside the vocabulary \[0, 100\)"),
        ({"token_ids": (1, 2, 3, 4, -1)}, "token id -1"),
        ({"finished_seq_ids": tuple(range(5))}, "finished ids: 5 exceeds the limit of 4"),
        (
            {"scheduled": (ScheduledSequence(1, 0, 65),), "token_ids": (), "new_sequences": ()},
            "tokens: 65 exceeds the limit of 64",
        ),
        (
            {"scheduled": tuple(ScheduledSequence(i, 0, 1) for i in range(5)), "token_ids": ()},
            "scheduled sequences: 5 exceeds",
        ),
        (
            {
                "scheduled": (ScheduledSequence(1, 0, 1), ScheduledSequence(1, 1, 1)),
                "token_ids": (),
            },
            "sequence 1 is scheduled twice",
        ),
        ({"scheduled": (ScheduledSequence(1, 0, 0),), "token_ids": ()}, "with no tokens"),
        (
            {"scheduled": (ScheduledSequence(1, 0, 1, new_block_ids=(8,)),), "token_ids": ()},
            "block id beyond this stage's 8 blocks",
        ),
    ],
)
def test_bad_plans_are_refused(overrides: dict, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        validate_plan(_plan(**overrides), LIMITS)


@pytest.mark.parametrize(
    "new,expected",
    [
        (NewSequenceData(3, (1, 2, 300), 3, SamplingParams()), "token id 300"),
        (
            NewSequenceData(3, (1, 2), 3, SamplingParams()),
            r"num_prompt_tokens 3 is not in \[1, 2\]",
        ),
        (NewSequenceData(3, (), 0, SamplingParams()), "num_prompt_tokens 0"),
    ],
)
def test_bad_new_sequences_are_refused(new: NewSequenceData, expected: str) -> None:
    with pytest.raises(ProtocolError, match=expected):
        validate_plan(_plan(new_sequences=(new,)), LIMITS)


def test_sequences_introduced_twice_are_refused() -> None:
    new = _plan().new_sequences[0]
    with pytest.raises(ProtocolError, match="introduced twice"):
        validate_plan(_plan(new_sequences=(new, new)), LIMITS)


def test_unknown_sequences_are_refused() -> None:
    plan = _plan()
    check_known_sequences(plan, known={9})  # 3 is introduced by the plan itself
    with pytest.raises(ProtocolError, match="never received: 9"):
        check_known_sequences(plan, known=set())
