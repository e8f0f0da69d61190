"""Request bodies of the OpenAI routes, with vLLM's extra sampling fields.

Types are strict (a string is never silently read as a number) so that a wrong type is a
400 naming the field; unknown fields are kept and ignored, as OpenAI does. Every optional
field also takes ``null``, as OpenAI's schema allows, meaning "the default". Ranges are
checked when the body becomes ``SamplingParams`` (molink/limits.py holds them), which
names the offending field too.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = None
    continuous_usage_stats: bool | None = None


class StructuredOutputs(_Body):
    """vLLM's ``structured_outputs``: exactly one constraint, and options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # Options beside the constraint (molink.api.structured_options).
    disable_any_whitespace: bool | None = None
    whitespace_pattern: str | None = None
    disable_additional_properties: bool | None = None
    disable_fallback: bool | None = None  # accepted: there is no fallback backend
    structural_tag: str | dict[str, Any] | None = None  # molink.api.structural_tag


class JsonSchemaFormat(_Body):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class SamplingFields(_Body):
    """Fields that both /v1/completions and /v1/chat/completions accept."""

    model: str | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: Any = None  # vLLM's; checked by molink.api.sampling
    bad_words: Any = None  # vLLM's; tokenized by molink.api.bad_words
    user: Any = None  # accepted and ignored
    response_format: ResponseFormat | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    stop_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    # vLLM's: logprobs name each token "token_id:N" (default: --return-tokens-as-token-ids).
    return_tokens_as_token_ids: bool | None = None
    # vLLM's: the prompt's token ids and each choice's generated ids in the response.
    return_token_ids: bool | None = None
    # vLLM's: a longer prompt keeps its last k tokens (-1: the context length).
    truncate_prompt_tokens: int | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older spelling of structured_outputs.
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_whitespace_pattern: str | None = None  # the whitespace a guided_json allows
    guided_decoding_backend: str | None = None  # accepted: llguidance enforces every grammar


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    # vLLM's: false tokenizes text prompts without the special tokens (BOS) added by default.
    add_special_tokens: bool | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: str = "function"
    function: FunctionDefinition


class NamedToolChoice(_Body):
    type: str = "function"
    function: dict[str, str]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    # OpenAI's range ends at 20; vLLM's (and this server's) at --max-logprobs.
    top_logprobs: int | None = Field(default=None, ge=0)
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    echo: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's: true puts the BOS token before the rendered conversation (unless it has one).
    add_special_tokens: bool | None = None
    # vLLM's: documents a retrieval-augmented chat template shows the model.
    documents: list[dict[str, str]] | None = None
    # vLLM's: false leaves reasoning_content out (with --reasoning-parser).
    include_reasoning: bool | None = None
    # OpenAI's, for reasoning models: reaches the chat template (gpt-oss reads it).
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    return_token_strs: bool | None = None
    # A conversation renders as chat completions render it (vLLM's tokenize takes these too).
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    documents: list[dict[str, str]] | None = None
    reasoning_effort: Literal["low", "medium", "high"] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
