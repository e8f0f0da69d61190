"""What a load run sends: a list of requests, each a prompt and an exact output length.

Prompts may be text or token ids. Token-id prompts (for /v1/completions) fix the prompt
length exactly without a tokenizer on the client side; ``ignore_eos`` (a vLLM extra field)
fixes the output length, so two runs of one workload do the same amount of work.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Literal

Prompt = str | list[int]
LengthDistribution = Literal["uniform", "log-uniform"]

# Random prompt tokens are drawn from this id range. Low ids are avoided because tokenizers
# put their special tokens (BOS, EOS, chat markers) there, and a prompt full of them is
# unlike real traffic; 10000 stays inside any vocabulary this project serves.
DEFAULT_TOKEN_ID_RANGE = (1000, 10000)

MIXED_PROMPT_LENGTHS = (32, 1024)
MIXED_OUTPUT_LENGTHS = (64, 256)


class WorkloadError(ValueError):
    """A workload description that cannot be generated or sent."""


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    prompt: Prompt
    max_tokens: int
    ignore_eos: bool = True

    @property
    def prompt_length(self) -> int | None:
        """Tokens in the prompt when it is given as ids; None for text."""
        return len(self.prompt) if isinstance(self.prompt, list) else None


def random_token_ids(
    rng: random.Random, length: int, id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE
) -> list[int]:
    low, high = id_range
    if not 0 <= low < high:
        raise WorkloadError(f"token id range {id_range} must satisfy 0 <= low < high")
    return [rng.randrange(low, high) for _ in range(length)]


def fixed_workload(
    num_requests: int,
    prompt_length: int,
    output_length: int,
    seed: int = 0,
    id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
) -> list[RequestSpec]:
    """``num_requests`` token-id prompts of ``prompt_length`` tokens, each asking for
    ``output_length`` new tokens. Prompts differ, so prefix caching cannot shortcut them."""
    _check_positive(
        num_requests=num_requests, prompt_length=prompt_length, output_length=output_length
    )
    rng = random.Random(seed)
    return [
        RequestSpec(random_token_ids(rng, prompt_length, id_range), output_length)
        for _ in range(num_requests)
    ]


def sample_length(rng: random.Random, bounds: tuple[int, int], dist: LengthDistribution) -> int:
    """An integer in [low, high], uniform or log-uniform (many short, few long)."""
    low, high = bounds
    if not 1 <= low <= high:
        raise WorkloadError(f"length bounds {bounds} must satisfy 1 <= low <= high")
    if dist == "uniform":
        return rng.randint(low, high)
    if dist == "log-uniform":
        # Sample log-space over [low, high + 1) and floor, so both ends stay reachable.
        value = math.exp(rng.uniform(math.log(low), math.log(high + 1)))
        return min(high, max(low, int(value)))
    raise WorkloadError(f"unknown length distribution {dist!r}")


def mixed_workload(
    num_requests: int,
    seed: int = 0,
    prompt_lengths: tuple[int, int] = MIXED_PROMPT_LENGTHS,
    output_lengths: tuple[int, int] = MIXED_OUTPUT_LENGTHS,
    prompt_dist: LengthDistribution = "uniform",
    id_range: tuple[int, int] = DEFAULT_TOKEN_ID_RANGE,
) -> list[RequestSpec]:
    """Token-id prompts with lengths drawn from ``prompt_lengths`` (by ``prompt_dist``) and
    output lengths drawn uniformly from ``output_lengths``; all bounds inclusive."""
    _check_positive(num_requests=num_requests)
    rng = random.Random(seed)
    specs = []
    for _ in range(num_requests):
        prompt_length = sample_length(rng, prompt_lengths, prompt_dist)
        output_length = sample_length(rng, output_lengths, "uniform")
        specs.append(RequestSpec(random_token_ids(rng, prompt_length, id_range), output_length))
    return specs


# Common English words that BPE vocabularies hold as one token each (with the leading
# space), so a prompt of n of them is close to n tokens on any such tokenizer.
_PROMPT_WORDS = (
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be",
    "by", "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but",
    "have", "an", "had", "they", "you", "were", "their", "one", "all", "we", "can", "her",
    "has", "there", "been", "if", "more", "when", "will", "would", "who", "so", "no",
)  # fmt: skip


def as_text_prompts(specs: list[RequestSpec]) -> list[RequestSpec]:
    """The same workload with each token-id prompt replaced by as many common words (for the
    chat route, which takes text). Lengths are then close to, not exactly, the ids' count."""
    converted = []
    for spec in specs:
        prompt = spec.prompt
        if isinstance(prompt, list):
            prompt = " ".join(_PROMPT_WORDS[token % len(_PROMPT_WORDS)] for token in prompt)
        converted.append(RequestSpec(prompt, spec.max_tokens, spec.ignore_eos))
    return converted


def text_workload(prompts: list[str], output_length: int) -> list[RequestSpec]:
    """Text prompts (for the chat route, or when exact prompt lengths do not matter)."""
    _check_positive(output_length=output_length)
    return [RequestSpec(prompt, output_length) for prompt in prompts]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise WorkloadError(f"{name} must be >= 1, got {value}")
