"""Turning request bodies into ``SamplingParams``, with OpenAI's defaults and clear refusals."""

from __future__ import annotations

from molink.api.errors import APIError
from molink.api.schemas import SamplingFields
from molink.sampling_params import SamplingParams


def build_sampling_params(
    body: SamplingFields, *, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """Raises InvalidParameterError (field named) for out-of-range values."""
    reject_unsupported(body)
    return SamplingParams(
        n=body.n,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=-1 if body.top_k is None else body.top_k,
        min_p=0.0 if body.min_p is None else body.min_p,
        repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=_stop_strings(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        max_tokens=max_tokens,
        min_tokens=body.min_tokens,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=body.skip_special_tokens,
        include_stop_str_in_output=body.include_stop_str_in_output,
        spaces_between_special_tokens=body.spaces_between_special_tokens,
    )


def reject_unsupported(body: SamplingFields) -> None:
    """Fields a client may rely on that this server cannot honour: say so rather than ignore."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", "logit_bias")
    if body.prompt_logprobs is not None:
        raise APIError(400, "prompt_logprobs is not supported by this server", "prompt_logprobs")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be set when stream is true", "stream_options")


def include_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(stop)
