"""Turning request bodies into ``SamplingParams``, with OpenAI's defaults and clear refusals."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from molink.api.bad_words import bad_words_token_ids
from molink.api.errors import APIError
from molink.api.schemas import SamplingFields
from molink.limits import LIMITS
from molink.sampling_params import SamplingParams, StructuredOutputSpec
from molink.tokenizer.protocol import TokenizerLike

# Sampling fields a model's generation_config.json may set defaults for (as vLLM reads it).
GENERATION_DEFAULT_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}


def build_sampling_params(
    body: SamplingFields,
    *,
    max_tokens: int | None,
    logprobs: int | None,
    vocab_size: int,
    tokenizer: TokenizerLike,
    structured: StructuredOutputSpec | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> SamplingParams:
    """Raises InvalidParameterError (field named) for out-of-range values. A field left out
    or sent as null takes the model's generation default, else OpenAI's. ``tokenizer``
    turns bad_words into token sequences."""
    reject_unsupported(body)
    chosen = {
        name: _pick(getattr(body, name), (defaults or {}).get(name), _NEUTRAL[name])
        for name in GENERATION_DEFAULT_FIELDS
    }
    return SamplingParams(
        n=_or(body.n, 1),
        **chosen,
        presence_penalty=_or(body.presence_penalty, 0.0),
        frequency_penalty=_or(body.frequency_penalty, 0.0),
        seed=body.seed,
        stop=_stop_strings(body.stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        max_tokens=max_tokens,
        min_tokens=_or(body.min_tokens, 0),
        ignore_eos=_or(body.ignore_eos, False),
        logprobs=logprobs,
        skip_special_tokens=_or(body.skip_special_tokens, True),
        include_stop_str_in_output=_or(body.include_stop_str_in_output, False),
        spaces_between_special_tokens=_or(body.spaces_between_special_tokens, True),
        logit_bias=logit_bias(body.logit_bias, vocab_size),
        allowed_token_ids=allowed_token_ids(body.allowed_token_ids, vocab_size),
        bad_words_token_ids=bad_words_token_ids(body.bad_words, tokenizer),
        structured=structured,
        prompt_logprobs=body.prompt_logprobs,
    )


def with_default_max_tokens(
    params: SamplingParams, defaults: Mapping[str, Any], prompt_len: int, max_model_len: int
) -> SamplingParams:
    """A request that left max_tokens out gets generation_config.json's max_new_tokens, cut
    to the room its prompt leaves in the context (vLLM's min of the two), not a refusal.

    ``params`` must carry the request's own max_tokens (None: left out). With no room at
    all it stays None, so that the engine reports the prompt as too long.
    """
    default = defaults.get("max_tokens")
    room = max_model_len - prompt_len
    if params.max_tokens is not None or default is None or room < 1:
        return params
    return dataclasses.replace(params, max_tokens=min(default, room))


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI sends token ids as JSON object keys (strings).

    vLLM reads each key with int(), so "5", "05", "+5" and " 5" all name token 5, and the
    last of them wins. Here a key must be the id in canonical decimal (ASCII digits, no
    sign, no leading zero): every token then has one spelling, so one entry, and the bias
    a request asks for is never decided by the order of its keys.
    """
    if not bias:
        return ()
    entries = []
    for key, value in bias.items():
        # The length first: int() refuses (ValueError) strings of over 4300 digits.
        too_long = len(key) > len(str(vocab_size))
        if too_long or _CANONICAL_ID.fullmatch(key) is None or int(key) >= vocab_size:
            raise APIError(
                400,
                f"logit_bias: key {key!r} is not a token id: keys must be token ids in "
                f"[0, {vocab_size - 1}], written in decimal without sign or leading zeros",
                "logit_bias",
            )
        entries.append((int(key), value))
    return tuple(sorted(entries))


def allowed_token_ids(value: Any, vocab_size: int) -> tuple[int, ...]:
    """vLLM's allowed_token_ids: only these ids may be sampled. None: any. As in vLLM, an
    empty list and ids outside the vocabulary are refused; repeats count once."""
    if value is None:
        return ()
    bound = LIMITS.max_allowed_token_ids
    if not isinstance(value, list) or not value or len(value) > bound:
        raise APIError(
            400,
            f"allowed_token_ids must be a non-empty list of at most {bound} token ids",
            "allowed_token_ids",
        )
    for token_id in value:
        if not isinstance(token_id, int) or isinstance(token_id, bool):
            raise APIError(400, "allowed_token_ids must hold integers", "allowed_token_ids")
        if not 0 <= token_id < vocab_size:
            raise APIError(
                400,
                f"allowed_token_ids: {token_id} is not a token id: ids must be in "
                f"[0, {vocab_size - 1}]",
                "allowed_token_ids",
            )
    return tuple(sorted(set(value)))


_CANONICAL_ID = re.compile(r"0|[1-9][0-9]*")


# Fields vLLM (or OpenAI's older function calling) implements and this server does not, with
# the values that ask for nothing; any other value is refused rather than ignored.
_UNIMPLEMENTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "use_beam_search": (None, False),
    "truncation_side": (None, "left"),  # truncate_prompt_tokens keeps a prompt's end
    "logits_processors": (None, []),
    "functions": (None,),
    "function_call": (None,),
}


def reject_unsupported(body: SamplingFields) -> None:
    """Fields a client may rely on that this server cannot honour: say so rather than ignore."""
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options can only be set when stream is true", "stream_options")
    extra = body.model_extra or {}
    for name, value in extra.items():
        if name in _UNIMPLEMENTED_FIELDS and not _is_one_of(value, _UNIMPLEMENTED_FIELDS[name]):
            raise APIError(400, f"{name} is not supported by this server", name)
    priority = extra.get("priority")
    if not _is_one_of(priority, (None, 0)):
        raise APIError(
            400,
            f"priority: {priority!r} asks for priority scheduling, which this server does not "
            "do (as vLLM without --scheduling-policy priority); send 0 or leave it out",
            "priority",
        )
    best_of = extra.get("best_of")  # a completions field; chat clients send it too
    if best_of is not None and best_of != (1 if body.n is None else body.n):
        raise APIError(
            400, "best_of must equal n: this server does not rank extra candidates", "best_of"
        )


def _is_one_of(value: Any, allowed: tuple[Any, ...]) -> bool:
    # By type too: 0 is not False here.
    return any(type(value) is type(choice) and value == choice for choice in allowed)


def reject_streamed_prompt_logprobs(body: SamplingFields) -> None:
    """A streamed response has no place for them (vLLM refuses them too): say so."""
    if body.stream and body.prompt_logprobs is not None:
        raise APIError(
            400, "prompt_logprobs are not available when stream is true", "prompt_logprobs"
        )


def check_max_logprobs(
    fields: Mapping[str, int | None], limit: int, per_prompt_token: Sequence[str] = ()
) -> None:
    """--max-logprobs bounds each logprobs field a request sends, as vLLM's does; the fields
    named in ``per_prompt_token`` ask for prompt logprobs, which have a bound of their own."""
    for name, value in fields.items():
        if value is not None and value > limit:
            raise APIError(
                400,
                f"{name}: {value} is more than this server allows (--max-logprobs {limit}); "
                f"ask for at most {limit}",
                name,
            )
        bound = LIMITS.max_prompt_logprobs
        if name in per_prompt_token and value is not None and value > bound:
            raise APIError(
                400,
                f"{name}: {value} asks for more than the {bound} alternatives per prompt "
                f"token this server returns (a prompt's logprobs travel in one message)",
                name,
            )


def tokens_as_ids(body: SamplingFields, server_default: bool) -> bool:
    """return_tokens_as_token_ids: the request's, else --return-tokens-as-token-ids."""
    value = body.return_tokens_as_token_ids
    return server_default if value is None else value


def include_usage(body: SamplingFields, forced: bool = False) -> bool:
    """A streamed response's closing usage chunk: asked for, or --enable-force-include-usage.

    As in vLLM, include_usage defaults to true once stream_options is sent: {} or
    {"continuous_usage_stats": true} alone ask for usage too.
    """
    options = body.stream_options
    if forced:
        return True
    if options is None:
        return False
    return "include_usage" not in options.model_fields_set or bool(options.include_usage)


def continuous_usage(body: SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.continuous_usage_stats)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _pick(value: Any, model_default: Any, neutral: Any) -> Any:
    if value is not None:
        return value
    return neutral if model_default is None else model_default


def _stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,) if stop else ()
    return tuple(stop)
