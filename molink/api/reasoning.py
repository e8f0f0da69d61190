"""Reasoning parsers (vLLM's --reasoning-parser): a reply's ``<think>...</think>`` part
becomes ``reasoning_content``, the rest ``content``, whole or streamed.

* ``deepseek_r1``: the opening ``<think>`` is optional (the chat template may have put it
  in the prompt); without ``</think>`` the whole reply is reasoning (it was cut short).
* ``qwen3``: as deepseek_r1, except that a whole reply without ``</think>`` is content
  (Qwen3 answers without thinking when told to), and with ``enable_thinking`` false in
  chat_template_kwargs nothing is parsed.

A stream cannot know whether ``</think>`` will come: it sends reasoning until it does, as
vLLM's streaming parsers do.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONING_PARSERS = ("deepseek_r1", "qwen3")
THINK_START = "<think>"
THINK_END = "</think>"


@dataclass(frozen=True)
class ReasoningSplit:
    reasoning: str | None
    content: str | None


def split_reasoning(parser: str, text: str) -> ReasoningSplit:
    """A whole reply, split as ``parser`` reads it."""
    body = text[len(THINK_START) :] if text.startswith(THINK_START) else text
    reasoning, found, content = body.partition(THINK_END)
    if not found:
        if parser == "qwen3":
            return ReasoningSplit(None, text)
        return ReasoningSplit(body or None, None)
    return ReasoningSplit(reasoning, content or None)


class ReasoningStream:
    """One streamed choice: each piece of text becomes (reasoning delta, content delta).

    Text that may be the start of a tag is held back until the next piece settles it.
    """

    def __init__(self) -> None:
        self._text = ""
        self._sent = 0  # characters of _text already sent (or skipped, for <think>)
        self._in_reasoning = True

    def feed(self, piece: str) -> tuple[str, str]:
        self._text += piece
        if not self._in_reasoning:
            return "", self._take(len(self._text))
        if self._sent == 0:
            if THINK_START.startswith(self._text):
                return "", ""  # maybe the opening tag: wait for more
            if self._text.startswith(THINK_START):
                self._sent = len(THINK_START)
        end = self._text.find(THINK_END, self._sent)
        if end >= 0:
            reasoning = self._take(end)
            self._sent = end + len(THINK_END)
            self._in_reasoning = False
            return reasoning, self._take(len(self._text))
        return self._take(len(self._text) - _partial_tag(self._text, self._sent)), ""

    def finish(self) -> tuple[str, str]:
        """What was held back, once the choice has ended."""
        if self._in_reasoning:
            return self._take(len(self._text)), ""
        return "", self._take(len(self._text))

    def _take(self, until: int) -> str:
        piece = self._text[self._sent : until]
        self._sent = max(self._sent, until)
        return piece


def _partial_tag(text: str, start: int) -> int:
    """How many characters at the end of text[start:] may begin ``</think>``."""
    for size in range(min(len(THINK_END) - 1, len(text) - start), 0, -1):
        if THINK_END.startswith(text[-size:]):
            return size
    return 0
