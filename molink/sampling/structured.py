"""Structured output: grammars turned into per-step token masks on the last stage.

The engine is llguidance (``llguidance`` on PyPI, one of vLLM's structured-output
backends). It was chosen over xgrammar because it installs as one small wheel with no
further dependencies (xgrammar pulls in triton and a TVM runtime, hundreds of megabytes
for a CPU host) and computes a mask in tens of microseconds without precomputing one per
grammar state, and over outlines-core because it covers every format a vLLM client sends
(JSON schema, regex, choice, Lark and GBNF grammars), not JSON schema and regex alone.

Cost model: the token trie (``LLTokenizer``) is built once per process from the
tokenizer; each distinct grammar is compiled once into a template matcher and kept in an
LRU cache; every sequence gets a cheap ``deep_copy`` of the template. Sequences without
a grammar never touch this module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
import torch

from molink.errors import InvalidParameterError, MolinkError
from molink.sampling_params import StructuredOutputSpec

logger = logging.getLogger(__name__)

DEFAULT_CACHE_SIZE = 256
_BITS = torch.arange(32, dtype=torch.int32)
# Compact JSON (no free whitespace, so a sampled run of spaces cannot eat max_tokens), and
# keywords the compiler does not implement are ignored rather than refused, as vLLM does.
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": True}


class GrammarRuntimeError(MolinkError):
    """A sequence's matcher refused a token or reached an error state."""


def to_llguidance_grammar(spec: StructuredOutputSpec, field: str = "structured_outputs") -> str:
    """The llguidance grammar for a spec; a named 400-style error when it is malformed."""
    try:
        if spec.kind == "json":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                spec.spec, defaults=_JSON_OPTIONS
            )
        elif spec.kind == "choice":
            choices = json.loads(spec.spec)
            if not isinstance(choices, list) or not choices:
                raise ValueError("choice must be a non-empty list of strings")
            if not all(isinstance(c, str) for c in choices):
                raise ValueError("choice must be a non-empty list of strings")
            grammar = llguidance.grammar_from("choice", choices)
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.spec)
        elif spec.kind == "grammar":
            grammar = llguidance.grammar_from("grammar", spec.spec)
        else:
            raise ValueError(f"unknown kind {spec.kind!r}")
    except (ValueError, TypeError, RuntimeError) as exc:
        raise InvalidParameterError(field, f"invalid {spec.kind}: {exc}") from exc
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidParameterError(field, f"invalid {spec.kind}: {messages[0]}")
    return grammar


class GrammarMatcher:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    def fill_mask(self, row: torch.Tensor) -> None:
        """Writes the allowed-token bitmask (int32 words, bit i of word w = token 32w+i)."""
        if self._matcher.is_error():
            raise GrammarRuntimeError(f"grammar error: {self._matcher.get_error()}")
        self._matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token_id: int) -> None:
        if not self._matcher.consume_token(token_id):
            raise GrammarRuntimeError(
                f"the grammar does not allow token {token_id}: {self._matcher.get_error()}"
            )

    @property
    def is_finished(self) -> bool:
        return self._matcher.is_stopped()


class GrammarCompiler:
    """Compiles grammars for one tokenizer, once each, and hands out matchers."""

    def __init__(
        self,
        tokenizer_json: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self.vocab_size = vocab_size
        self._tokenizer_json = tokenizer_json
        self._eos = list(eos_token_ids)
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputSpec, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.num_compiled = 0

    @property
    def mask_words(self) -> int:
        return (self.vocab_size + 31) // 32

    def warm_up(self) -> None:
        """Builds the token trie now (about a second for a 50k vocabulary)."""
        self._ll_tokenizer()

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                start = time.perf_counter()
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json, n_vocab=self.vocab_size, eos_token=self._eos or None
                )
                logger.info("structured output ready in %.2f s", time.perf_counter() - start)
            return self._tokenizer

    def matcher(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        return GrammarMatcher(self._template(spec).deep_copy())

    def _template(self, spec: StructuredOutputSpec) -> llguidance.LLMatcher:
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                return cached
        grammar = to_llguidance_grammar(spec)
        template = llguidance.LLMatcher(self._ll_tokenizer(), grammar)
        if template.is_error():
            raise InvalidParameterError(
                "structured_outputs", f"invalid {spec.kind}: {template.get_error()}"
            )
        with self._lock:
            self._cache[spec] = template
            self.num_compiled += 1
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return template


def apply_bitmask(logits: torch.Tensor, rows: list[int], masks: torch.Tensor) -> None:
    """Sets every token a row's mask forbids to -inf (``masks``: int32 [len(rows), words];
    bit i of word w allows token 32w + i). When every row is constrained the logits are
    masked in place, without gathering the rows first."""
    vocab_size = logits.shape[1]
    bits = (masks.unsqueeze(-1) >> _BITS) & 1
    allowed = bits.flatten(1)[:, :vocab_size].bool().to(logits.device)
    if len(rows) == logits.shape[0] and rows == list(range(len(rows))):
        logits.masked_fill_(~allowed, float("-inf"))
        return
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    sub = logits.index_select(0, index)
    sub.masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, sub)


def grammar_compiler_for(tokenizer_dir: str, vocab_size: int) -> GrammarCompiler:
    """A compiler for the tokenizer a last stage's model was trained with."""
    from molink.tokenizer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    return GrammarCompiler(tokenizer.to_json(), vocab_size, tokenizer.eos_token_ids)
