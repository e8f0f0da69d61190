"""Chunks of a streamed chat completion: content deltas, tool-call deltas, usage."""

from __future__ import annotations

from typing import TYPE_CHECKING

from molink.api.context import usage_body
from molink.api.reasoning import ReasoningStream
from molink.api.streaming import ChoiceCursor
from molink.api.tool_parsers import ParsedToolCall, new_call_id
from molink.outputs import RequestOutput
from molink.tokenizer.protocol import TokenizerLike

if TYPE_CHECKING:
    from molink.api.chat import ChatMeta


class _ToolStream:
    """What of one choice's text is content a client may see now, and its tool calls.

    Named calls stream their arguments as they come; with ``auto`` the text from where a
    call may start is held back and, at the end, becomes tool calls (or content after all);
    ``required`` replies are read once complete.
    """

    def __init__(self, meta: ChatMeta) -> None:
        self._plan = meta.tools
        self._text = ""
        self._released = 0
        self.call_id = new_call_id()
        self.num_calls = 0

    def content_delta(self, text: str) -> str:
        self._text += text
        if self._plan.mode in ("named", "required"):
            return ""
        held_from = len(self._text)
        if self._plan.mode == "auto" and self._plan.parser is not None:
            start = self._plan.parser.call_start(self._text)
            if start is not None:
                held_from = start
        delta = self._text[self._released : max(self._released, held_from)]
        self._released = max(self._released, held_from)
        return delta

    def named_arguments(self, text: str) -> list[dict]:
        """Tool-call deltas of a named choice: the call itself first, then arguments."""
        deltas = []
        if self.num_calls == 0:
            self.num_calls = 1
            function = {"name": self._plan.function_name, "arguments": ""}
            deltas.append(
                {"index": 0, "id": self.call_id, "type": "function", "function": function}
            )
        if text:
            deltas.append({"index": 0, "function": {"arguments": text}})
        return deltas

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """(content still held back, tool calls) once the choice has ended."""
        if self._plan.mode == "named":
            return "", []
        content, calls = self._plan.read(self._text)
        if calls:
            return "", calls
        rest = self._text[self._released :]
        self._released = len(self._text)
        return rest, []


class ChatStreamFormatter:
    """Chat chunks: a role chunk per choice, then deltas, then the finish reason."""

    def __init__(
        self, tokenizer: TokenizerLike, meta: ChatMeta, include_usage: bool, continuous: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._meta = meta
        self._include_usage = include_usage
        self._continuous = continuous
        self._cursors: dict[int, ChoiceCursor] = {}
        self._tools: dict[int, _ToolStream] = {}
        self._thoughts: dict[int, ReasoningStream] = {}
        self._prompt_tokens = 0
        self._completion_tokens: dict[int, int] = {}

    def on_start(self, firsts: list[RequestOutput]) -> list[dict]:
        (first,) = firsts
        self._prompt_tokens = len(first.prompt_token_ids)
        chunks = []
        for index in range(self._meta.n):
            delta = {"role": self._meta.role, "content": ""}
            chunks.append(self._chunk(_item(index, delta)))
            if index == 0 and self._meta.return_token_ids:
                # vLLM's return_token_ids: the prompt's ids once, in the stream's first chunk.
                chunks[0]["prompt_token_ids"] = list(first.prompt_token_ids)
            if self._meta.echo_text:
                chunks.append(self._chunk(_item(index, {"content": self._meta.echo_text})))
        return chunks

    def on_output(self, _: int, output: RequestOutput) -> list[dict]:
        chunks = []
        for choice in output.outputs:
            delta = self._cursors.setdefault(choice.index, ChoiceCursor()).advance(choice)
            if delta is None:
                continue
            self._completion_tokens[choice.index] = len(choice.token_ids)
            tools = self._tools.setdefault(choice.index, _ToolStream(self._meta))
            finish = delta.finish_reason
            message = self._delta(choice.index, tools, delta.text, finish is not None)
            if finish is not None:
                finish = self._finish(tools, message, finish)
            item = _item(choice.index, message, finish)
            item["logprobs"] = self._meta.logprobs(
                self._tokenizer, choice, delta.start_token, delta.end_token
            )
            if finish is not None:
                item["stop_reason"] = choice.stop_reason
            if self._meta.return_token_ids:
                item["token_ids"] = choice.token_ids[delta.start_token : delta.end_token]
            chunks.append(self._chunk(item))
        return chunks

    def _delta(self, index: int, tools: _ToolStream, text: str, last: bool) -> dict:
        if self._meta.tools.mode == "named":
            calls = tools.named_arguments(text)
            return {"tool_calls": calls} if calls else {}
        message = {}
        if self._meta.reasoning_parser is not None:
            thoughts = self._thoughts.setdefault(index, ReasoningStream())
            reasoning, text = thoughts.feed(text)
            if last:
                held_reasoning, held_text = thoughts.finish()
                reasoning, text = reasoning + held_reasoning, text + held_text
            if reasoning and self._meta.include_reasoning:
                message["reasoning_content"] = reasoning
        content = tools.content_delta(text)
        if content:
            message["content"] = content
        return message

    def _finish(self, tools: _ToolStream, message: dict, finish: str) -> str:
        rest, calls = tools.finish()
        if rest:
            message["content"] = message.get("content", "") + rest
        if calls:
            message["tool_calls"] = [
                {"index": i, **call.to_openai()} for i, call in enumerate(calls)
            ]
            if finish == "stop":
                return "tool_calls"
        return finish

    def on_end(self) -> list[dict]:
        if not self._include_usage:
            return []
        chunk = self._meta.envelope("chat.completion.chunk", [])
        chunk["usage"] = self._usage()
        return [chunk]

    def _usage(self) -> dict:
        return usage_body(self._prompt_tokens, sum(self._completion_tokens.values()))

    def _chunk(self, choice: dict) -> dict:
        chunk = self._meta.envelope("chat.completion.chunk", [choice])
        if self._continuous and self._include_usage:
            chunk["usage"] = self._usage()
        return chunk


def _item(index: int, delta: dict, finish: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
