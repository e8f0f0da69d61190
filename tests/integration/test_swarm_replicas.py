"""Two replicas of the tail span behind one head (``molink serve`` processes):

* requests spread over both replicas and give exactly what one process gives;
* a replica killed between requests: the head drops it (missed health checks) and later
  requests succeed over the other one; no node holds a sequence afterwards.
"""

from __future__ import annotations

import gc

import pytest

from molink.engine.offline import LLM
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    assert_same_completions,
    complete_all,
    metric_series,
    mixed_cases,
    reference_completions,
    running_pipeline,
    wait_answering,
    wait_pipeline_idle,
    wait_until,
)

pytestmark = pytest.mark.integration

NUM_REQUESTS = 12
MAX_TOKENS = (7, 20, 1, 12)
DROP_TIMEOUT_S = 30.0
# Both tail nodes announce the same speed: until its steps are timed the routing rule takes
# a node at the layer step time it measured at start, which a loaded machine can inflate
# for one of them and so send a whole burst to the other.
SAME_SPEED = ("--molink-layer-step-ms", "5")


def _route_counts(base_url: str) -> dict[str, float]:
    return metric_series(base_url, "molink:route_sequences_total")


def _replicas_of_last_layer(base_url: str) -> float:
    series = metric_series(base_url, "molink:layer_replicas")
    return next((v for k, v in series.items() if 'layer="3"' in k), 0.0)


async def test_two_tail_replicas_share_the_work_and_survive_one(tiny_model_dir) -> None:
    model = str(tiny_model_dir("qwen3"))
    llm = LLM(model=model)
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), NUM_REQUESTS, MAX_TOKENS)
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    with running_pipeline((0, 2, 4), model, stage_args={1: SAME_SPEED}) as pipeline:
        replica = pipeline.start_stage(2, -1, extra_args=SAME_SPEED)
        wait_answering(replica)
        wait_until(
            lambda: _replicas_of_last_layer(pipeline.base_url) == 2,
            DROP_TIMEOUT_S,
            "the head counts two replicas of layer 3",
        )
        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        counts = _route_counts(pipeline.base_url)
        assert len(counts) == 2 and all(v > 0 for v in counts.values()), counts
        wait_pipeline_idle(pipeline)

        replica.kill()
        wait_until(
            lambda: _replicas_of_last_layer(pipeline.base_url) == 1,
            DROP_TIMEOUT_S,
            "the head dropped the killed replica",
        )
        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        wait_pipeline_idle(pipeline)
