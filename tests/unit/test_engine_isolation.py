"""A sequence that fails on the head (text, stop strings) or on the last stage (sampling)
ends alone with an error; the other sequences of its steps finish as they would have."""

from __future__ import annotations

from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams


def _run(llm: LLM, broken_request: str | None) -> dict[str, tuple[str | None, list[int]]]:
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for index in range(3):
        engine.add_request(f"r{index}", [5, 6, 7 + index], params)
    if broken_request is not None:

        def fail(_: int):
            raise RuntimeError("detokenizer failure")

        engine._requests[broken_request].detokenizers[0].add_token = fail
    finished = {}
    for _ in range(100):
        for output in engine.step():
            if output.finished:
                choice = output.outputs[0]
                finished[output.request_id] = (choice.finish_reason, choice.token_ids)
        if not engine.has_unfinished_requests():
            break
    return finished


def test_a_failing_sequence_on_the_head_ends_alone(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    clean = _run(llm, None)
    broken = _run(llm, "r1")
    assert broken["r1"][0] == "error"
    assert broken["r0"] == clean["r0"] and broken["r2"] == clean["r2"]
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_total_blocks
