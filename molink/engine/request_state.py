"""The head's view of one request: its n outputs, detokenizers and timing.

It owns the text, logprobs, finish reasons and timings of a request; the tokens are the
scheduler's (each ``Sequence``, read through ``SequenceTokens``): see
molink/scheduler/sequence.py for who owns which piece of a sequence's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from molink.outputs import CompletionOutput, RequestMetrics, RequestOutput
from molink.sampling_params import SamplingParams
from molink.scheduler.sequence import SequenceTokens
from molink.step import PromptTokenLogprob
from molink.tokenizer.detokenizer import IncrementalDetokenizer
from molink.tokenizer.protocol import TokenizerLike


@dataclass
class RequestState:
    """``outputs[i]`` holds sequence i's text, logprobs and finish; its token ids are read
    from ``sequences[i]`` when a snapshot is taken (``token_ids`` and ``delta_token_ids``
    of ``outputs`` stay empty here)."""

    request_id: str
    params: SamplingParams
    sequences: list[SequenceTokens]
    prompt_token_ids: tuple[int, ...]  # the scheduler's own (immutable) prompt, not a copy
    outputs: list[CompletionOutput]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    prompt_logprobs: list[PromptTokenLogprob] | None = None
    route: tuple[str, ...] = ()  # see RequestOutput.route
    # Output tokens of each sequence already handed out; the next deltas start there.
    num_tokens_sent: list[int] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        request_id: str,
        sequences: list[SequenceTokens],
        params: SamplingParams,
        tokenizer: TokenizerLike,
        arrival_time: float,
    ) -> RequestState:
        prompt = sequences[0].prompt_token_ids
        return cls(
            request_id=request_id,
            params=params,
            sequences=sequences,
            prompt_token_ids=prompt,
            outputs=[
                CompletionOutput(
                    index=i,
                    logprobs=[] if params.logprobs is not None else None,
                    top_logprobs=[] if params.logprobs is not None else None,
                )
                for i in range(len(sequences))
            ],
            detokenizers=[IncrementalDetokenizer(tokenizer, prompt, params) for _ in sequences],
            metrics=RequestMetrics(arrival_time=arrival_time),
            num_tokens_sent=[0] * len(sequences),
        )

    @property
    def seq_ids(self) -> list[int]:
        return [seq.seq_id for seq in self.sequences]

    @property
    def finished(self) -> bool:
        return all(out.finished for out in self.outputs)

    def snapshot(self) -> RequestOutput:
        """An immutable-enough copy for another thread; deltas reset afterwards."""
        copies = []
        for index, (out, seq) in enumerate(zip(self.outputs, self.sequences, strict=True)):
            token_ids = seq.output_tokens_from(0)
            copies.append(
                replace(
                    out,
                    token_ids=token_ids,
                    logprobs=None if out.logprobs is None else list(out.logprobs),
                    top_logprobs=None if out.top_logprobs is None else list(out.top_logprobs),
                    delta_token_ids=token_ids[self.num_tokens_sent[index] :],
                )
            )
            self.num_tokens_sent[index] = len(token_ids)
            out.delta_text = ""
        return RequestOutput(
            request_id=self.request_id,
            prompt_token_ids=self.prompt_token_ids,
            outputs=copies,
            finished=self.finished,
            metrics=replace(self.metrics),
            prompt_logprobs=self.prompt_logprobs,
            route=self.route,
        )
