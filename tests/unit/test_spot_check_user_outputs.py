"""What users get under spot checks with a lying primary (head and stages as threads of
this process, toy executors, the engine loop as the server runs it, F = 1): a replica that
returns wrong tokens, or perturbs its hidden states so slightly that no token changes, is
banned within a few steps, and every output any request ever showed, streamed or final,
is what one process gives: the liar's tokens for checked steps were held until their
verdict and dropped, and their sequences replayed from the last verified token."""

from __future__ import annotations

import time

import pytest

from molink.engine.llm_engine import LLMEngine
from molink.pipeline.toy import expected_token
from molink.sampling_params import SamplingParams
from tests.helpers.fake_engine import FakeTokenizer
from tests.helpers.polling import wait_until
from tests.helpers.spot_swarm import MODEL, lying_swarm
from tests.unit.test_scheduler_helpers import make_scheduler

PROMPTS = ([5, 6, 7], [8, 9], [10, 11, 12, 13])
MAX_TOKENS = 6


def _one_process(prompt: list[int], seq_id: int) -> list[int]:
    tokens = [prompt[-1]]
    for _ in range(MAX_TOKENS):
        tokens.append(expected_token(tokens[-1], seq_id, MODEL.num_layers, MODEL.vocab_size))
    return tokens[1:]


@pytest.mark.parametrize(
    ("lie", "span"),
    [("wrong-tokens", (2, 4)), ("slightly-perturbed-hidden-states", (1, 2))],
)
def test_users_get_what_one_process_gives_though_the_primary_lies(
    lie: str, span: tuple[int, int]
) -> None:
    with lying_swarm(lie, span, "primary") as swarm:
        head, liar = swarm.head, swarm.liar
        scheduler = make_scheduler(enable_prefix_caching=False)
        engine = LLMEngine(
            scheduler, head, FakeTokenizer(), num_micro_batches=2, router=head.routes, recovery=head
        )
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
        for index, prompt in enumerate(PROMPTS):
            engine.add_request(f"r{index}", prompt, greedy)  # sequence ids 0, 1, 2
        shown: dict[str, list[list[int]]] = {f"r{i}": [] for i in range(len(PROMPTS))}
        deadline = time.monotonic() + 120
        while engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "the requests did not finish"
            for output in engine.step(poll_timeout=0.05):
                assert output.outputs[0].error is None, output.outputs[0].error
                shown[output.request_id].append(list(output.outputs[0].token_ids))
        for index, prompt in enumerate(PROMPTS):
            expected = _one_process(prompt, index)
            seen = shown[f"r{index}"]
            assert seen and seen[-1] == expected, (index, seen)
            assert all(s == expected[: len(s)] for s in seen), (index, seen)  # streamed too

        assert wait_until(lambda: head.pipeline().stage(liar.node_id) is None, 30.0)
        assert list(head.banned_nodes()) == [liar.node_id]
        metrics = "\n".join(head.metric_lines())
        # Every sequence started on the liar's route: each of its checked tokens was held.
        assert 'molink_spot_check_held_tokens_total{outcome="dropped"} 0' not in metrics
        assert scheduler.num_replayed_sequences >= 1
