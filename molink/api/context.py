"""What every route needs: the engine, the names it answers to, metrics, running streams."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fastapi import Request

from molink.api.errors import APIError
from molink.api.metrics import ServerMetrics
from molink.api.runner import GenerationRun, Prompt, StreamRegistry
from molink.engine.protocol import EngineClient
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChatOptions:
    """How chat requests are rendered and read (vLLM's serving flags of the same names)."""

    chat_template: str | None = None  # replaces the model's template
    trust_request_chat_template: bool = False
    tool_call_parser: str | None = None  # molink.api.tool_parsers name
    enable_auto_tool_choice: bool = False
    generation_defaults: dict = field(default_factory=dict)  # from generation_config.json
    max_logprobs: int = 20  # --max-logprobs: most logprobs/top_logprobs/prompt_logprobs
    response_role: str = "assistant"  # --response-role: a reply's role after a gen. prompt
    reasoning_parser: str | None = None  # --reasoning-parser (molink.api.reasoning)
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    chat_template_content_format: str = "auto"  # molink.api.chat_render.CONTENT_FORMATS
    force_include_usage: bool = False  # --enable-force-include-usage: streams end with usage


@dataclass
class ServerContext:
    engine: EngineClient
    served_model_names: tuple[str, ...]
    metrics: ServerMetrics
    streams: StreamRegistry = field(default_factory=StreamRegistry)
    api_key: str | None = None
    chat: ChatOptions = field(default_factory=ChatOptions)
    created: int = field(default_factory=lambda: int(time.time()))
    # Told of every finished request besides the metrics (e.g. the dashboard's charts).
    finished_observers: list[Callable[[RequestOutput], None]] = field(default_factory=list)
    num_active_requests: int = 0  # HTTP requests being served, for /load

    @property
    def default_model_name(self) -> str:
        return self.served_model_names[0]

    def resolve_model(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve."""
        if requested is None or requested == "":
            return self.default_model_name
        if requested not in self.served_model_names:
            raise APIError(
                404, f"The model `{requested}` does not exist.", "model", "model_not_found"
            )
        return requested

    def ensure_ready(self) -> None:
        if self.streams.closing_reason is not None:
            raise APIError(503, "the server is shutting down")
        reason = self.engine.readiness()
        if reason is not None:
            raise APIError(503, f"the model is not ready to serve requests: {reason}")

    def check_prompt_size(self, num_chars: int, field_name: str) -> None:
        """Refuses text that cannot fit the context before it is tokenized: no token covers
        more than ``max_token_chars`` characters, so such a prompt is too long for sure."""
        limit = self.engine.max_model_len * self.engine.tokenizer.max_token_chars
        if num_chars > limit:
            raise APIError(
                400,
                f"the prompt has {num_chars} characters, more than the {limit} that the "
                f"context of {self.engine.max_model_len} tokens can ever hold",
                field_name,
                "context_length_exceeded",
            )

    def new_run(
        self,
        request_ids: Sequence[str],
        prompts: Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> GenerationRun:
        return GenerationRun(
            self.engine,
            self.streams,
            request_ids,
            prompts,
            params,
            on_finished=self._finished,
            on_aborted=self.metrics.observe_aborted,
            on_tokens=self.metrics.observe_tokens,
        )

    def _finished(self, output: RequestOutput) -> None:
        self.metrics.observe_finished(output)
        for observe in self.finished_observers:
            observe(output)


def get_context(request: Request) -> ServerContext:
    return request.app.state.molink


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sub_request_ids(request_id: str, count: int) -> list[str]:
    """Engine request ids for the prompts of one HTTP request; unique across the server."""
    if count == 1:
        return [request_id]
    return [f"{request_id}-{index}" for index in range(count)]


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
