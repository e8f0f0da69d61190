"""Per-request sampling parameters, validated with named errors (vLLM's names and meanings)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from molink.errors import InvalidParameterError
from molink.limits import LIMITS

MAX_LOGPROBS = LIMITS.max_logprobs
STRUCTURED_KINDS = ("json", "regex", "choice", "grammar")
_GREEDY_EPSILON = 1e-5


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A grammar the last stage enforces: ``kind`` is one of STRUCTURED_KINDS; ``spec`` is a
    JSON schema (json), a regular expression (regex), a JSON list of strings (choice), or a
    Lark/GBNF grammar (grammar)."""

    kind: str
    spec: str


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: sampled token + k alternatives
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    spaces_between_special_tokens: bool = True
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), ids ascending
    # vLLM's allowed_token_ids: only these may be sampled (empty: any), ids ascending
    allowed_token_ids: tuple[int, ...] = ()
    # vLLM's bad_words as token sequences: a sequence's last token is never sampled right
    # after the rest of it (a one-token sequence: never)
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    structured: StructuredOutputSpec | None = None
    prompt_logprobs: int | None = None  # None: none; k: each prompt token + k alternatives
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        # Accept lists from JSON bodies but keep the object hashable/immutable.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", tuple(tuple(kv) for kv in self.logit_bias or ()))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids or ()))
        bad = tuple(tuple(ids) for ids in self.bad_words_token_ids or ())
        object.__setattr__(self, "bad_words_token_ids", bad)
        self.validate()

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPSILON

    def with_seed(self, seed: int | None) -> SamplingParams:
        return replace(self, seed=seed)

    def validate(self) -> None:
        _check(
            _is_int(self.n) and 1 <= self.n <= LIMITS.max_n,
            "n",
            f"must be an integer in [1, {LIMITS.max_n}]",
        )
        _check(
            _finite(self.temperature) and 0 <= self.temperature <= LIMITS.max_temperature,
            "temperature",
            f"must be in [0, {LIMITS.max_temperature:g}]",
        )
        _check(_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]")
        _check(
            _is_int(self.top_k) and (self.top_k == -1 or 0 <= self.top_k <= LIMITS.max_top_k),
            "top_k",
            f"must be -1 (disabled), 0 (disabled) or an integer in [1, {LIMITS.max_top_k}]",
        )
        _check(_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]")
        _check(
            _finite(self.repetition_penalty) and 0 < self.repetition_penalty <= 10,
            "repetition_penalty",
            "must be in (0, 10]",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_finite(value) and -2 <= value <= 2, name, "must be in [-2, 2]")
        self._validate_lengths()
        self._validate_logprobs()
        if self.seed is not None:
            _check(
                _is_int(self.seed) and LIMITS.min_seed <= self.seed <= LIMITS.max_seed,
                "seed",
                f"must be an integer in [{LIMITS.min_seed}, {LIMITS.max_seed}]",
            )
        self._validate_stops()
        self._validate_logit_bias()
        _check_token_ids(self.allowed_token_ids, "allowed_token_ids", LIMITS.max_allowed_token_ids)
        self._validate_bad_words()
        self._validate_structured()

    def _validate_lengths(self) -> None:
        if self.max_tokens is not None:
            _check(
                _is_int(self.max_tokens) and 1 <= self.max_tokens <= LIMITS.max_tokens,
                "max_tokens",
                f"must be an integer in [1, {LIMITS.max_tokens}]",
            )
        _check(
            _is_int(self.min_tokens) and 0 <= self.min_tokens <= LIMITS.max_tokens,
            "min_tokens",
            f"must be an integer in [0, {LIMITS.max_tokens}]",
        )
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParameterError("min_tokens", "must be <= max_tokens")

    def _validate_logprobs(self) -> None:
        if self.logprobs is not None:
            _check(
                _is_int(self.logprobs) and 0 <= self.logprobs <= LIMITS.max_logprobs,
                "logprobs",
                f"must be an integer in [0, {LIMITS.max_logprobs}]",
            )
        if self.prompt_logprobs is not None:
            _check(
                _is_int(self.prompt_logprobs)
                and 0 <= self.prompt_logprobs <= LIMITS.max_prompt_logprobs,
                "prompt_logprobs",
                f"must be an integer in [0, {LIMITS.max_prompt_logprobs}]",
            )

    def _validate_stops(self) -> None:
        _check(
            len(self.stop) <= LIMITS.max_stop_strings,
            "stop",
            f"at most {LIMITS.max_stop_strings} stop strings are allowed",
        )
        _check(
            all(
                isinstance(s, str) and 0 < len(s) <= LIMITS.max_stop_string_chars and _utf8(s)
                for s in self.stop
            ),
            "stop",
            f"must be non-empty valid Unicode strings of at most "
            f"{LIMITS.max_stop_string_chars} characters",
        )
        _check_token_ids(self.stop_token_ids, "stop_token_ids", LIMITS.max_stop_token_ids)

    def _validate_logit_bias(self) -> None:
        _check(
            len(self.logit_bias) <= LIMITS.max_logit_bias_entries,
            "logit_bias",
            f"at most {LIMITS.max_logit_bias_entries} entries are allowed",
        )
        bound = LIMITS.max_logit_bias
        for entry in self.logit_bias:
            _check(
                len(entry) == 2 and _is_int(entry[0]) and 0 <= entry[0] <= LIMITS.max_token_id,
                "logit_bias",
                f"keys must be token ids in [0, {LIMITS.max_token_id}]",
            )
            _check(
                _finite(entry[1]) and -bound <= entry[1] <= bound,
                "logit_bias",
                f"values must be in [{-bound:g}, {bound:g}]",
            )

    def _validate_bad_words(self) -> None:
        _check(
            len(self.bad_words_token_ids) <= LIMITS.max_bad_word_sequences,
            "bad_words",
            f"at most {LIMITS.max_bad_word_sequences} token sequences are allowed",
        )
        longest = LIMITS.max_bad_word_tokens
        for ids in self.bad_words_token_ids:
            _check(
                0 < len(ids) <= longest
                and all(_is_int(t) and 0 <= t <= LIMITS.max_token_id for t in ids),
                "bad_words",
                f"each must be 1 to {longest} token ids in [0, {LIMITS.max_token_id}]",
            )

    def _validate_structured(self) -> None:
        spec = self.structured
        if spec is None:
            return
        _check(
            spec.kind in STRUCTURED_KINDS,
            "structured_outputs",
            f"kind must be one of {', '.join(STRUCTURED_KINDS)}",
        )
        _check(
            isinstance(spec.spec, str)
            and 0 < len(spec.spec) <= LIMITS.max_structured_spec_chars
            and _utf8(spec.spec),
            "structured_outputs",
            f"must be non-empty valid Unicode text of at most "
            f"{LIMITS.max_structured_spec_chars} characters",
        )


def _check_token_ids(ids: tuple[int, ...], name: str, most: int) -> None:
    _check(len(ids) <= most, name, f"at most {most} ids are allowed")
    _check(
        all(_is_int(t) and 0 <= t <= LIMITS.max_token_id for t in ids),
        name,
        f"must be integers in [0, {LIMITS.max_token_id}]",
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _utf8(text: str) -> bool:
    """False for text with lone surrogates, which neither the wire nor tokenizers carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(field_name, message)
