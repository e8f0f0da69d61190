"""The one table of what a request may ask for, shared by the HTTP layer and the wire.

Every bound here is what the engine and molink.proto can carry: a value that passes the
HTTP schema always fits its wire field (uint32, int32, int64, ...) and the sampler, so it
can never fail other requests batched with it. ``SamplingParams.validate`` checks against
this table, on the head for HTTP requests and on every stage for decoded plans.
"""

from __future__ import annotations

from dataclasses import dataclass

UINT32_MAX = (1 << 32) - 1
INT32_MAX = (1 << 31) - 1
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class RequestLimits:
    max_n: int = 128
    max_temperature: float = 2.0  # as OpenAI documents
    max_top_k: int = INT32_MAX  # int32 on the wire
    min_seed: int = INT64_MIN  # int64 on the wire
    max_seed: int = INT64_MAX
    max_tokens: int = UINT32_MAX  # uint32 on the wire (max_tokens and min_tokens)
    max_token_id: int = UINT32_MAX  # uint32 on the wire (stop_token_ids, logit_bias keys)
    max_stop_strings: int = 64  # the transport's PlanLimits default
    max_stop_string_chars: int = 1024
    max_stop_token_ids: int = 1024
    # Alternatives per sampled token. The sampler takes any k (a top-k of the log-softmax);
    # the bound is the wire: a step of 4096 sequences (PlanLimits' most) at 1025 entries of
    # ~16 bytes each is ~67 MB, a quarter of the 256 MiB message limit, so a request at the
    # bound cannot make a step's result too large for the requests batched with it.
    max_logprobs: int = 1024
    # Per prompt token. The whole prompt's logprobs travel with the first token in one
    # message (a 128k-token prompt at 21 entries is ~43 MB): OpenAI's 20 stays the bound.
    max_prompt_logprobs: int = 20
    max_logit_bias_entries: int = 1024
    # vLLM's allowed_token_ids: a step carries each new sequence's list, so a step of
    # 4096 new sequences at the bound stays near 50 MB of the 256 MiB message limit.
    max_allowed_token_ids: int = 4096
    # vLLM's bad_words, as the token sequences they become (two spellings per word).
    max_bad_words: int = 128  # words a request may send
    max_bad_word_chars: int = 256
    max_bad_word_sequences: int = 256  # token sequences on the wire
    max_bad_word_tokens: int = 64  # tokens in one sequence
    max_logit_bias: float = 100.0  # OpenAI's range is [-100, 100]
    max_structured_spec_chars: int = 1 << 20


LIMITS = RequestLimits()
