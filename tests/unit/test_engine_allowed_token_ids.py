"""allowed_token_ids and bad words through the engine (a tiny llama): every sampled token,
greedy or not, is one of the allowed ids (the same requests without them sample others);
a bad word's last token is not sampled right after the rest of it."""

from __future__ import annotations

from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams

ALLOWED = (5, 9, 17)


def test_every_token_is_an_allowed_one(tiny_model_dir) -> None:
    llm = LLM(
        model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=64, num_kv_blocks=32
    )
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=8, ignore_eos=True)
    free = [o.outputs[0].token_ids for o in llm.generate([[8, 9], [8, 9]], [greedy, sampled])]
    assert any(set(tokens) - set(ALLOWED) for tokens in free)  # not allowed by chance
    limited = [
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, allowed_token_ids=ALLOWED),
        SamplingParams(
            temperature=1.0, seed=3, max_tokens=8, ignore_eos=True, allowed_token_ids=ALLOWED
        ),
    ]
    outputs = llm.generate([[8, 9], [8, 9]], limited)
    for output in outputs:
        tokens = output.outputs[0].token_ids
        assert len(tokens) == 8 and set(tokens) <= set(ALLOWED), tokens


def test_bad_words_keep_their_last_token_out(tiny_model_dir) -> None:
    llm = LLM(
        model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=64, num_kv_blocks=32
    )

    def greedy(**extra: object) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, **extra)
        (output,) = llm.generate([[8, 9]], params)
        return list(output.outputs[0].token_ids)

    free = greedy()
    first, second = free[0], free[1]
    assert first not in greedy(bad_words_token_ids=[(first,)])  # a one-token word: never
    after = greedy(bad_words_token_ids=[(first, second)])  # second never right after first
    assert after[0] == first and after[1] != second


def test_a_request_that_can_sample_nothing_fails_and_the_other_finishes(tiny_model_dir) -> None:
    llm = LLM(
        model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=64, num_kv_blocks=32
    )
    eos = min(llm.engine.scheduler.eos_token_ids)
    nothing = SamplingParams(temperature=0.0, max_tokens=8, allowed_token_ids=[eos], min_tokens=3)
    free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    failed, finished = llm.generate([[8, 9], [8, 9]], [nothing, free])
    assert failed.outputs[0].finish_reason == "error" and failed.outputs[0].token_ids == []
    assert finished.outputs[0].finish_reason == "length" and len(finished.outputs[0].token_ids) == 8
    assert not llm.engine.has_unfinished_requests()
