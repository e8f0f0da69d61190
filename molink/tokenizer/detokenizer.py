"""Incremental detokenization with stop strings, for streaming.

Two layers:

* ``_TokenStream`` turns tokens into text. It decodes only a small window (the tokens since
  the last clean point plus one token of context, so that decoders which treat a leading
  space specially behave as in a full decode), and holds back the trailing U+FFFD
  characters of that window: they stand for a multi-byte character split across tokens
  that the next token may complete.
* ``IncrementalDetokenizer`` adds stop strings: it holds back the longest tail of the text
  that could still grow into a stop string, and on a match truncates the text before the
  stop string (or after it, with include_stop_str_in_output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.sampling_params import SamplingParams
from molink.tokenizer.protocol import TokenizerLike

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded as context before the first output token (as vLLM does), so the
# first output token decodes as it does after the prompt (e.g. keeps its leading space).
PROMPT_CONTEXT_TOKENS = 5
# An incomplete UTF-8 character has at most 3 bytes; byte-level decoders show it as one
# U+FFFD, byte-fallback decoders as one per byte. A byte-fallback decoder also turns every
# byte of the same run of byte tokens into U+FFFD while the run ends inside a character,
# so the context character's bytes (at most 4) show as U+FFFD too: 4 + 3 covers both.
_MAX_HELD_CHARS = 7
# An incomplete character's bytes lie within this many trailing tokens.
_TOKENS_FOR_HELD_CHARS = 4
# Context that starts inside a character is moved back over at most this many tokens.
_MAX_CHAR_TOKENS = 4
# A window longer than this is shortened (e.g. a long run of tokens that all end inside a
# character, or of skipped special tokens), so the work per token stays bounded.
_MAX_WINDOW_TOKENS = 32


@dataclass(frozen=True)
class DetokenizerStep:
    delta_text: str  # text to append to the stream
    stop_string: str | None = None  # the stop string that matched at this step, if any


def decode_output(
    tokenizer: TokenizerLike, token_ids: Sequence[int], skip_special_tokens: bool = True
) -> str:
    """Decode a whole token sequence with the same rules as the incremental stream.

    This is ``tokenizer.decode``, as vLLM's detokenizer for fast (tokenizer.json) tokenizers
    gives it. spaces_between_special_tokens changes nothing there: set, it inserts no
    spaces (only slow tokenizers did); unset, it only drops a space a decoder puts between
    two added tokens, which none of the byte-level, Metaspace or byte-fallback decoders do.
    """
    return tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)


class _TokenStream:
    """Text of a growing token sequence, released only once its characters are complete."""

    def __init__(
        self,
        tokenizer: TokenizerLike,
        context_ids: Sequence[int],
        skip_special_tokens: bool,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        # The last decode's ids and text: a token's step decodes the same ids up to three
        # times (its slide checks the one-token window, then measures it).
        self._last_decoded: tuple[list[int], str] = ([], "")
        self._window: list[int] = list(context_ids)  # context tokens, then pending ones
        # Context cut inside a character would join the output's byte tokens (see
        # _character_start): it starts at the next character instead.
        for _ in range(_MAX_CHAR_TOKENS - 1):
            if not self._decode(self._window).startswith(_REPLACEMENT_CHAR):
                break
            self._window.pop(0)
        # Context ending inside a character would let the first output bytes complete that
        # character, which belongs to the prompt; without it they decode as they do alone.
        while self._window and self._decode(self._window).endswith(_REPLACEMENT_CHAR):
            self._window.pop()
        self._emitted = len(self._decode(self._window))  # chars of the window already released

    def add(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        held = _count_trailing_replacements(text)
        delta = text[self._emitted : len(text) - held]
        self._emitted = max(self._emitted, len(text) - held)
        if not held:
            self._slide()
        elif len(self._window) > _MAX_WINDOW_TOKENS:
            self._shorten(text, held)
        return delta

    def flush(self) -> str:
        """What was held back, except an incomplete character at the very end: a sequence
        cut inside a character (e.g. by max_tokens) ends before it, as in vLLM, rather than
        with U+FFFD."""
        text = self._decode(self._window)
        delta = text[self._emitted : len(text) - _count_trailing_replacements(text)]
        self._slide()
        return delta

    def _slide(self) -> None:
        """Keep as context only the window's last token that reaches the decoder, and what
        follows it: a skipped special token gives no context for the next token's spacing."""
        start = len(self._window) - 1
        if self._skip_special:
            while start > 0 and self._tokenizer.is_special(self._window[start]):
                start -= 1
        start = max(start, len(self._window) - _MAX_WINDOW_TOKENS)
        start = self._character_start(start)
        self._window = self._window[start:]
        self._emitted = len(self._decode(self._window))

    def _character_start(self, start: int) -> int:
        """Move ``start`` back to the first token of the character it lies in. A context
        token holding the last byte of a character split over byte-fallback tokens would
        join the next run of byte tokens, which the decoder then shows as U+FFFD whole."""
        earliest = max(0, start - _MAX_CHAR_TOKENS + 1)
        candidate = start
        while candidate > earliest and self._decode(self._window[candidate:]).startswith(
            _REPLACEMENT_CHAR
        ):
            candidate -= 1
        if self._decode(self._window[candidate:]).startswith(_REPLACEMENT_CHAR):
            return start  # not a split character (or a replacement the model produced)
        return candidate

    def _shorten(self, text: str, held: int) -> None:
        """Drop all but the last few tokens while some characters are held back.

        The shorter window decodes to a suffix of ``text`` except at its start (where bytes
        of a character begun earlier now stand alone); as long as the held characters lie in
        the common suffix, they remain the last ``held`` characters of the shorter window.
        """
        window = self._window[-_TOKENS_FOR_HELD_CHARS:]
        window_text = self._decode(window)
        if _common_suffix_length(text, window_text) > held:
            self._window = window
            self._emitted = len(window_text) - held

    def _decode(self, token_ids: list[int]) -> str:
        last_ids, last_text = self._last_decoded
        if token_ids == last_ids:
            return last_text
        text = decode_output(self._tokenizer, token_ids, self._skip_special)
        self._last_decoded = (list(token_ids), text)
        return text


def _count_trailing_replacements(text: str) -> int:
    count = 0
    while count < _MAX_HELD_CHARS and count < len(text) and text[-1 - count] == _REPLACEMENT_CHAR:
        count += 1
    return count


def _common_suffix_length(first: str, second: str) -> int:
    length = 0
    limit = min(len(first), len(second))
    while length < limit and first[-1 - length] == second[-1 - length]:
        length += 1
    return length


class IncrementalDetokenizer:
    """Streams the output text of one sequence, token by token.

    ``add_token`` returns the text that became final; ``flush`` (at the end of generation)
    releases what was held back. The concatenation of all deltas is ``text``. Once a stop
    string has matched, the text is final and further tokens are ignored.
    """

    def __init__(
        self, tokenizer: TokenizerLike, prompt_token_ids: Sequence[int], params: SamplingParams
    ) -> None:
        self._params = params
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:]) if prompt_token_ids else []
        self._stream = _TokenStream(tokenizer, context, params.skip_special_tokens)
        self._stops = tuple(params.stop)
        self._max_stop_length = max((len(stop) for stop in self._stops), default=0)
        self._text = ""  # all final text so far, truncated at a matched stop string
        self._num_released = 0  # chars of _text handed out as deltas
        self._num_output_tokens = 0
        self._stop_string: str | None = None

    @property
    def text(self) -> str:
        """The output text released so far (the concatenation of the deltas)."""
        return self._text[: self._num_released]

    @property
    def stop_string(self) -> str | None:
        return self._stop_string

    @property
    def stopped(self) -> bool:
        return self._stop_string is not None

    @property
    def num_output_tokens(self) -> int:
        return self._num_output_tokens

    def add_token(self, token_id: int) -> DetokenizerStep:
        if self.stopped:
            return DetokenizerStep("")
        self._num_output_tokens += 1
        return self._append(self._stream.add(token_id), final=False)

    def flush(self) -> DetokenizerStep:
        """Release everything held back; call once when the sequence finishes."""
        if self.stopped:
            return DetokenizerStep("")
        return self._append(self._stream.flush(), final=True)

    def _append(self, new_text: str, final: bool) -> DetokenizerStep:
        previous_length = len(self._text)
        self._text += new_text
        # vLLM does not look for stop strings until min_tokens tokens were generated.
        if new_text and self._stops and self._num_output_tokens > self._params.min_tokens:
            match = find_stop_string(self._text, previous_length, self._stops)
            if match is not None:
                return self._stop_at(*match)
        held = 0
        if not final and not self._params.include_stop_str_in_output:
            # With include_stop_str_in_output everything up to a stop's end is emitted anyway,
            # so nothing needs holding back.
            held = partial_stop_length(self._text, self._stops, self._max_stop_length)
        return self._release(len(self._text) - held, None)

    def _stop_at(self, index: int, stop: str) -> DetokenizerStep:
        end = index + len(stop) if self._params.include_stop_str_in_output else index
        self._text = self._text[:end]
        self._stop_string = stop
        return self._release(end, stop)

    def _release(self, end: int, stop: str | None) -> DetokenizerStep:
        delta = self._text[self._num_released : end] if end > self._num_released else ""
        self._num_released = max(self._num_released, end)
        return DetokenizerStep(delta, stop)


def find_stop_string(
    text: str, new_text_start: int, stops: Sequence[str]
) -> tuple[int, str] | None:
    """The earliest stop string that ends after ``new_text_start`` (earlier ones were already
    looked for), as ``(index, stop)``; on a tie the one listed first."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop, max(0, new_text_start - len(stop) + 1))
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def partial_stop_length(text: str, stops: Sequence[str], max_stop_length: int) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    firsts = {stop[0] for stop in stops if stop}
    for length in range(min(len(text), max_stop_length - 1), 0, -1):
        if text[-length] not in firsts:
            continue  # no stop string starts with this tail's first character
        tail = text[-length:]
        if any(len(stop) > length and stop.startswith(tail) for stop in stops):
            return length
    return 0
