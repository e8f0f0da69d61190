"""What ``LLM.generate`` hands back is the caller's own, shaped as vLLM returns it."""

from __future__ import annotations

from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams


def test_generate_returns_the_prompt_as_a_list_of_its_own(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    (output,) = llm.generate([[5, 6, 7]], params)
    assert output.prompt_token_ids == [5, 6, 7]
    output.prompt_token_ids.append(8)  # a list of its own: changing it touches nothing else
    (again,) = llm.generate([[5, 6, 7]], params)
    assert again.prompt_token_ids == [5, 6, 7]
    assert again.outputs[0].token_ids == output.outputs[0].token_ids
