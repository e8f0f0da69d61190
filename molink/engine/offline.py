"""Offline batch generation in this process (tests, benchmarks, scripts)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from molink.engine.factory import EngineOptions, build_local_engine
from molink.errors import ContextLengthExceededError
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams


class LLM:
    """``LLM(model=None).generate(prompts, params)``: runs every prompt to completion.

    ``wire_dtype`` (with ``layer_splits``) passes the hidden states between the layer
    ranges through the wire codec, as between the nodes of a pipeline."""

    def __init__(
        self,
        model: str | None = None,
        layer_splits: list[int] | None = None,
        wire_dtype: str | None = None,
        **options: Any,
    ) -> None:
        self.options = replace(EngineOptions(model=model), **options)
        self.engine, self.source, self.max_model_len = build_local_engine(
            self.options, layer_splits, wire_dtype
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        params_list = _broadcast(params or SamplingParams(), len(prompts))
        order: list[str] = []
        try:
            for prompt, p in zip(prompts, params_list, strict=True):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                if len(ids) >= self.max_model_len:
                    raise ContextLengthExceededError(len(ids), self.max_model_len)
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, ids, p)
                order.append(request_id)
        except Exception:
            # A refused prompt fails the whole call: none of its requests may stay queued.
            for request_id in order:
                self.engine.abort_request(request_id)
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step(finished_only=True):
                finished[output.request_id] = output
        # The streamed outputs share the scheduler's prompt tuple; the caller gets a list of
        # its own, as vLLM's LLM.generate returns.
        return [_own_prompt_list(finished[request_id]) for request_id in order]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _broadcast(params: SamplingParams | Sequence[SamplingParams], n: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * n
    return list(params)


def _own_prompt_list(output: RequestOutput) -> RequestOutput:
    return replace(output, prompt_token_ids=list(output.prompt_token_ids))
