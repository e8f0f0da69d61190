"""A stage computing several queued micro-batches in one pass gives what it gives one by one."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from molink.config import LayerRange
from molink.errors import ProtocolError
from molink.sampling_params import SamplingParams
from molink.stage.worker import StageWorker
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.weights import resolve_model_source

BLOCK_SIZE = 4
NUM_BLOCKS = 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def _stages(model_dir: Path) -> list[StageWorker]:
    source = resolve_model_source(str(model_dir))
    config = source.model_config
    bounds = [LayerRange(0, 1), LayerRange(1, config.num_layers)]
    return [
        StageWorker(
            source.load_slice(r, "float32"), config, r, NUM_BLOCKS, BLOCK_SIZE, torch.float32
        )
        for r in bounds
    ]


def _prefill_plan(step_id: int, micro_batch: int, prompts: dict[int, list[int]]) -> StepPlan:
    """Whole prompts of fresh sequences; sequence ``s`` owns blocks ``8 s`` .. ``8 s + 7``."""
    scheduled, tokens, new = [], [], []
    for seq_id, prompt in prompts.items():
        blocks = tuple(range(8 * seq_id, 8 * seq_id + -(-len(prompt) // BLOCK_SIZE)))
        scheduled.append(ScheduledSequence(seq_id, 0, len(prompt), blocks, sample=True))
        tokens += prompt
        new.append(NewSequenceData(seq_id, tuple(prompt), len(prompt), GREEDY))
    return StepPlan(step_id, tuple(scheduled), tuple(tokens), tuple(new), micro_batch=micro_batch)


def _run_alone(stages: list[StageWorker], plans: list[StepPlan]) -> list[StepResult]:
    results = []
    for plan in plans:
        hidden = stages[0].execute(plan, None)
        results.append(stages[1].execute(plan, hidden))
    return results


def _run_together(stages: list[StageWorker], plans: list[StepPlan]) -> list[StepResult]:
    hidden = stages[0].execute_many([(plan, None) for plan in plans])
    return stages[1].execute_many(list(zip(plans, hidden, strict=True)))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[..., Path]) -> Path:
    return tiny_model_dir("qwen3")


def test_one_pass_over_queued_micro_batches_equals_one_at_a_time(model_dir: Path) -> None:
    plans = [
        _prefill_plan(1, 0, {0: [5, 9, 13, 2, 7], 1: [3, 3, 8]}),
        _prefill_plan(2, 1, {2: [11, 4, 6, 1, 1, 9, 30, 12, 5]}),
        _prefill_plan(3, 2, {3: [7], 4: [21, 22]}),
    ]
    alone = _run_alone(_stages(model_dir), plans)
    together = _run_together(_stages(model_dir), plans)
    assert [r.step_id for r in together] == [1, 2, 3]
    assert [r.micro_batch for r in together] == [0, 1, 2]
    for a, b in zip(alone, together, strict=True):
        assert [t.seq_id for t in a.sampled] == [t.seq_id for t in b.sampled]
        assert [t.token_id for t in a.sampled] == [t.token_id for t in b.sampled]
        for x, y in zip(a.sampled, b.sampled, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_hidden_states_come_back_per_plan(model_dir: Path) -> None:
    first = _stages(model_dir)[0]
    plans = [_prefill_plan(1, 0, {0: [5, 9, 13]}), _prefill_plan(2, 1, {1: [3, 3, 8, 1, 2]})]
    outputs = first.execute_many([(plan, None) for plan in plans])
    assert [tuple(o.shape) for o in outputs] == [(3, 64), (5, 64)]
    assert all(o.is_contiguous() for o in outputs)


def test_a_bad_plan_fails_alone(model_dir: Path) -> None:
    stages = _stages(model_dir)
    good = _prefill_plan(1, 0, {0: [5, 9, 13]})
    unknown = StepPlan(2, (ScheduledSequence(77, 0, 1, (), sample=True),), (4,), micro_batch=1)
    outputs = stages[0].execute_many([(good, None), (unknown, None)])
    assert isinstance(outputs[1], ProtocolError) and "unknown sequence id 77" in str(outputs[1])
    assert isinstance(outputs[0], torch.Tensor) and outputs[0].shape[0] == 3
