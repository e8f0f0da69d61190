"""A result holds no more than a step can produce: at most max_seqs_per_step sampled
tokens, max_tokens_per_step prompt logprob entries in all, and as many alternatives per
token as a request may ask for (molink.limits). The last node of a route could otherwise
make the head build millions of objects from one message; such a result fails its step
(its sequences replay) with a message naming the bound."""

from __future__ import annotations

import dataclasses

from molink.limits import LIMITS
from molink.step import FailureKind, PromptTokenLogprob, TokenLogprob
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.polling import first_result
from tests.helpers.toy_swarm import CONFIG, prefill, toy_swarm


def _stuffing(executor, stuff) -> None:  # type: ignore[no-untyped-def]
    honest = executor._sample
    executor._sample = lambda plan, x: tuple(stuff(t) for t in honest(plan, x))


def test_a_result_with_more_alternatives_than_a_request_may_ask_fails_its_step() -> None:
    many = tuple(TokenLogprob(1, -1.0) for _ in range(LIMITS.max_logprobs + 1))
    with toy_swarm((("n", 1, 4),)) as swarm:
        _stuffing(swarm.executors["n"], lambda t: dataclasses.replace(t, top_logprobs=many))
        swarm.head.submit(prefill(1, 5))
        result = first_result(swarm.head)
        assert result.failure_kind is FailureKind.REJECTED and not result.sampled
        assert result.error is not None
        assert f"{LIMITS.max_logprobs + 1} alternatives" in result.error
        assert f"limit of {LIMITS.max_logprobs}" in result.error


def test_a_result_with_more_prompt_logprobs_than_a_step_has_tokens_fails_its_step() -> None:
    limit = 64  # a small bound keeps the message small
    with toy_swarm((("n", 1, 4),), dataclasses.replace(CONFIG, max_tokens_per_step=limit)) as swarm:
        entries = (PromptTokenLogprob(-1.0, ()),) * (limit + 1)
        _stuffing(swarm.executors["n"], lambda t: dataclasses.replace(t, prompt_logprobs=entries))
        swarm.head.submit(prefill(1, 5))
        result = first_result(swarm.head)
        assert result.failure_kind is FailureKind.REJECTED and not result.sampled
        assert result.error is not None
        assert f"{limit + 1} prompt logprob entries, over the limit of {limit}" in result.error


def test_an_honest_result_still_arrives_whole() -> None:
    few = tuple(TokenLogprob(1, -1.0) for _ in range(LIMITS.max_logprobs))
    with toy_swarm((("n", 1, 4),)) as swarm:
        _stuffing(swarm.executors["n"], lambda t: dataclasses.replace(t, top_logprobs=few))
        swarm.head.submit(prefill(1, 5))
        result = first_result(swarm.head)
        assert result.error is None
        (token,) = result.sampled
        assert len(token.top_logprobs) == LIMITS.max_logprobs


def test_a_result_with_more_trace_entries_than_a_route_has_hops_fails_its_step() -> None:
    with toy_swarm((("n", 1, 4),)) as swarm:
        outbox = swarm.nodes["n"]._outbox
        honest = outbox.return_result

        def stuffed(route, result, trace):  # type: ignore[no-untyped-def]
            honest(route, result, [*trace, *(pb.HopTrace(node_id="x") for _ in range(4))])

        outbox.return_result = stuffed
        swarm.head.submit(prefill(1, 5))
        result = first_result(swarm.head)
        assert result.failure_kind is FailureKind.REJECTED and not result.sampled
        assert result.error is not None
        assert "6 trace entries, more than a route's 4 hops at most" in result.error
