"""Each output names the route whose nodes computed its latest tokens (from the step's
trace); a request moved to another route midway names the new one from then on."""

from __future__ import annotations

import dataclasses

from molink.engine.llm_engine import served_route
from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams
from molink.step import StepResult

FIRST = {"head": {}, "a": {}, "b": {}}
SECOND = {"head": {}, "c": {}, "b": {}}


def test_served_route_follows_the_trace_and_ignores_failed_steps() -> None:
    assert served_route(StepResult(1, stage_timings=FIRST)) == ("head", "a", "b")
    assert served_route(StepResult(1, error="lost", stage_timings=FIRST)) == ()
    assert served_route(StepResult(1)) == ()


def test_outputs_carry_the_route_of_their_latest_step(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    engine = llm.engine
    poll = engine.executor.poll
    polls = []

    def traced_poll(timeout: float) -> list[StepResult]:
        polls.append(timeout)
        trace = FIRST if len(polls) <= 2 else SECOND  # "fails over" after two steps
        return [dataclasses.replace(r, stage_timings=trace) for r in poll(timeout)]

    engine.executor.poll = traced_poll
    engine.add_request(
        "r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    )
    routes = []
    for _ in range(50):
        routes += [output.route for output in engine.step()]
        if not engine.has_unfinished_requests():
            break
    assert routes[:2] == [("head", "a", "b")] * 2
    assert routes[-1] == ("head", "c", "b") and len(routes) == 5
