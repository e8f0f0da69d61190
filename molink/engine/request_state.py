"""The head's view of one request: its n outputs, detokenizers and timing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from molink.outputs import CompletionOutput, RequestMetrics, RequestOutput
from molink.sampling_params import SamplingParams
from molink.step import PromptTokenLogprob
from molink.tokenizer.detokenizer import IncrementalDetokenizer
from molink.tokenizer.protocol import TokenizerLike


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    outputs: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    seq_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[PromptTokenLogprob] | None = None
    route: tuple[str, ...] = ()  # see RequestOutput.route

    @classmethod
    def create(
        cls,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer: TokenizerLike,
        arrival_time: float | None = None,
    ) -> RequestState:
        n = params.n
        return cls(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            params=params,
            outputs=[
                CompletionOutput(
                    index=i,
                    logprobs=[] if params.logprobs is not None else None,
                    top_logprobs=[] if params.logprobs is not None else None,
                )
                for i in range(n)
            ],
            detokenizers=[
                IncrementalDetokenizer(tokenizer, prompt_token_ids, params) for _ in range(n)
            ],
            metrics=RequestMetrics(arrival_time=arrival_time or time.monotonic()),
        )

    @property
    def finished(self) -> bool:
        return all(out.finished for out in self.outputs)

    def snapshot(self) -> RequestOutput:
        """An immutable-enough copy for another thread; deltas reset afterwards."""
        copies = []
        for out in self.outputs:
            copies.append(
                replace(
                    out,
                    token_ids=list(out.token_ids),
                    logprobs=None if out.logprobs is None else list(out.logprobs),
                    top_logprobs=None if out.top_logprobs is None else list(out.top_logprobs),
                    delta_token_ids=list(out.delta_token_ids),
                )
            )
            out.delta_text = ""
            out.delta_token_ids = []
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=copies,
            finished=self.finished,
            metrics=replace(self.metrics),
            prompt_logprobs=self.prompt_logprobs,
            route=self.route,
        )
