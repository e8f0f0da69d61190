"""A deterministic stand-in for an EngineClient, for testing the HTTP layer without a model.

The tokenizer maps each character to one token; every choice "generates" a fixed script
(rotated by its index so that choices differ), one character per step, honouring max_tokens,
stop strings, stop token ids, logprobs and n. Switches make it fail in the ways a real
engine can: not ready, an exception mid-stream, an output with finish_reason "error".
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator
from typing import Any

from molink.engine.protocol import EngineStats
from molink.errors import ContextLengthExceededError, MolinkError, PipelineError
from molink.outputs import CompletionOutput, RequestMetrics, RequestOutput
from molink.sampling_params import SamplingParams
from molink.step import TokenLogprob

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
_SPECIAL_TEXT = {BOS_ID: "<s>", EOS_ID: "</s>", PAD_ID: "<pad>"}
_NUM_SPECIAL = len(_SPECIAL_TEXT)
DEFAULT_SCRIPT = "Hello world, this is a fake engine speaking. "


class FakeTokenizer:
    """One token per character (code points below 256); ids 0-2 are special."""

    eos_token_ids = (EOS_ID,)
    bos_token_id = BOS_ID
    vocab_size = _NUM_SPECIAL + 256
    max_token_chars = 5  # "<pad>"
    name_or_path = "fake-tokenizer"

    def token_id(self, char: str) -> int:
        code = ord(char)
        return _NUM_SPECIAL + (code if code < 256 else ord("?"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.token_id(c) for c in text]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self._piece(t, skip_special_tokens) for t in token_ids)

    def _piece(self, token_id: int, skip_special: bool) -> str:
        if token_id in _SPECIAL_TEXT:
            return "" if skip_special else _SPECIAL_TEXT[token_id]
        return chr(token_id - _NUM_SPECIAL)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self._piece(t, False) for t in token_ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        for index, message in enumerate(messages):
            if message["role"] == "system" and index > 0:
                raise ValueError("the system message must come first")
        text = "".join(f"[{m['role']}]{m['content']}\n" for m in messages)
        if kwargs.get("continue_final_message"):
            return text.removesuffix("\n")  # the final message stays open
        return text + ("[assistant]" if add_generation_prompt else "")

    def is_special(self, token_id: int) -> bool:
        return token_id in _SPECIAL_TEXT


@dataclasses.dataclass
class FakeEngineOptions:
    step_delay: float = 0.0  # seconds between generated tokens
    eos_after: int | None = None  # emit EOS after this many tokens
    fail_after: int | None = None  # raise PipelineError after this many steps
    error_after: int | None = None  # end with finish_reason "error" after this many steps
    error_choices: tuple[int, ...] | None = None  # only these choices err; None: all of them
    submit_error: MolinkError | None = None  # raised before the first output
    # The route (node ids) that computes each step, the last one for every later step: a
    # change mid-request stands for a failover.
    routes: tuple[tuple[str, ...], ...] = ()


class FakeEngine:
    """Implements molink.engine.protocol.EngineClient."""

    def __init__(
        self,
        model_name: str = "fake-model",
        max_model_len: int = 256,
        script: str = DEFAULT_SCRIPT,
        options: FakeEngineOptions | None = None,
        kv_total_blocks: int = 64,
    ) -> None:
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.tokenizer = FakeTokenizer()
        self.script = script
        self.options = options or FakeEngineOptions()
        self.kv_total_blocks = kv_total_blocks
        self.not_ready_reason: str | None = None
        self.submitted: list[tuple[str, str | list[int], SamplingParams]] = []
        self.cancelled: list[str] = []  # generators closed before finishing
        self.abort_calls: list[str] = []  # explicit EngineClient.abort calls
        self.active: set[str] = set()
        self.shut_down = False

    def readiness(self) -> str | None:
        return self.not_ready_reason

    async def abort(self, request_id: str) -> None:
        self.abort_calls.append(request_id)

    def metric_lines(self) -> list[str]:
        return []

    def shutdown(self) -> None:
        self.shut_down = True

    def stats(self) -> EngineStats:
        used = min(len(self.active), self.kv_total_blocks)
        return EngineStats(
            num_running=len(self.active),
            num_waiting=0,
            kv_total_blocks=self.kv_total_blocks,
            kv_free_blocks=self.kv_total_blocks - used,
        )

    def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        return self._generate(request_id, prompt, params)

    async def _generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncGenerator[RequestOutput, None]:
        self.submitted.append((request_id, prompt, params))
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = self._check_fits(prompt_ids, params)
        if self.options.submit_error is not None:
            raise self.options.submit_error
        metrics = RequestMetrics(arrival_time=time.monotonic())
        choices = [CompletionOutput(index=i) for i in range(params.n)]
        self.active.add(request_id)
        finished = False
        try:
            step = 0
            while not finished:
                await asyncio.sleep(self.options.step_delay)
                step += 1
                self._maybe_fail(step, choices)
                for choice in choices:
                    if choice.finish_reason is None:
                        self._advance(choice, params, max_tokens)
                metrics.first_token_time = metrics.first_token_time or time.monotonic()
                finished = all(c.finish_reason is not None for c in choices)
                if finished:
                    metrics.finished_time = time.monotonic()
                output = self._snapshot(request_id, prompt, prompt_ids, choices, metrics, finished)
                if self.options.routes:
                    output.route = self.options.routes[min(step, len(self.options.routes)) - 1]
                yield output
        finally:
            self.active.discard(request_id)
            if not finished:
                self.cancelled.append(request_id)

    def _check_fits(self, prompt_ids: list[int], params: SamplingParams) -> int:
        if len(prompt_ids) >= self.max_model_len:
            raise ContextLengthExceededError(len(prompt_ids), self.max_model_len)
        if params.max_tokens is None:
            return self.max_model_len - len(prompt_ids)
        if len(prompt_ids) + params.max_tokens > self.max_model_len:
            raise ContextLengthExceededError(
                len(prompt_ids) + params.max_tokens, self.max_model_len, "prompt + max_tokens"
            )
        return params.max_tokens

    def _maybe_fail(self, step: int, choices: list[CompletionOutput]) -> None:
        if self.options.fail_after is not None and step > self.options.fail_after:
            raise PipelineError("stage 1 stopped answering")
        if self.options.error_after is not None and step > self.options.error_after:
            for choice in choices:
                chosen = self.options.error_choices
                if choice.finish_reason is None and (chosen is None or choice.index in chosen):
                    choice.finish_reason, choice.error = "error", "stage 1 died"

    def _advance(self, choice: CompletionOutput, params: SamplingParams, max_tokens: int) -> None:
        count = len(choice.token_ids)
        if self.options.eos_after is not None and count >= self.options.eos_after:
            token_id = EOS_ID
        else:
            token_id = self.tokenizer.token_id(self._script_char(choice.index, count))
        choice.token_ids.append(token_id)
        choice.delta_token_ids = [token_id]
        piece = self.tokenizer.decode([token_id], params.skip_special_tokens)
        choice.delta_text = piece
        choice.text += piece
        if params.logprobs is not None:
            self._add_logprobs(choice, token_id, params.logprobs)
        self._check_stop(choice, token_id, params, max_tokens)

    def _script_char(self, choice_index: int, position: int) -> str:
        return self.script[(choice_index + position) % len(self.script)]

    def _add_logprobs(self, choice: CompletionOutput, token_id: int, k: int) -> None:
        choice.logprobs = (choice.logprobs or []) + [-0.25]
        alternatives = [TokenLogprob(token_id, -0.25)] + [
            TokenLogprob(self.tokenizer.token_id(chr(ord("a") + j)), -2.0 - j) for j in range(k)
        ]
        choice.top_logprobs = (choice.top_logprobs or []) + [alternatives[:k]]

    def _check_stop(
        self, choice: CompletionOutput, token_id: int, params: SamplingParams, max_tokens: int
    ) -> None:
        if token_id == EOS_ID and not params.ignore_eos:
            choice.finish_reason = "stop"
            return
        if token_id in params.stop_token_ids:
            choice.finish_reason, choice.stop_reason = "stop", token_id
            return
        for stop in params.stop:
            where = choice.text.find(stop)
            if where >= 0:
                end = where + len(stop) if params.include_stop_str_in_output else where
                choice.text = choice.text[:end]
                choice.finish_reason, choice.stop_reason = "stop", stop
                return
        if len(choice.token_ids) >= max_tokens:
            choice.finish_reason = "length"

    def _snapshot(
        self,
        request_id: str,
        prompt: str | list[int],
        prompt_ids: list[int],
        choices: list[CompletionOutput],
        metrics: RequestMetrics,
        finished: bool,
    ) -> RequestOutput:
        copies = [
            dataclasses.replace(
                c,
                token_ids=list(c.token_ids),
                logprobs=None if c.logprobs is None else list(c.logprobs),
                top_logprobs=None if c.top_logprobs is None else list(c.top_logprobs),
                delta_token_ids=list(c.delta_token_ids),
            )
            for c in choices
        ]
        return RequestOutput(
            request_id=request_id,
            prompt_token_ids=list(prompt_ids),
            outputs=copies,
            finished=finished,
            metrics=dataclasses.replace(metrics),
            prompt_text=prompt if isinstance(prompt, str) else None,
        )


def sse_payloads(body: str) -> list[str]:
    """The data fields of a server-sent-events body, in order (``[DONE]`` included)."""
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def _serve_fake_engine(argv: list[str]) -> int:
    """``python -m tests.helpers.fake_engine [serve flags] [--step-delay S]``: the real CLI
    serving path (signals, graceful stop) with this fake engine behind it."""
    import argparse

    from molink.cli.args import add_engine_args
    from molink.cli.main import parse_engine_args
    from molink.cli.serve import run_server

    parser = add_engine_args(argparse.ArgumentParser(prog="fake-engine-server"))
    parser.add_argument("--step-delay", type=float, default=0.0)
    namespace = parser.parse_args(argv)
    options = FakeEngineOptions(step_delay=namespace.step_delay)
    args = parse_engine_args(parser, namespace)
    return run_server(args, engine_factory=lambda _: FakeEngine(options=options))


if __name__ == "__main__":
    import sys

    sys.exit(_serve_fake_engine(sys.argv[1:]))
