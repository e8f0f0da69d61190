"""Named errors. User input gets one of these with a message that says what is allowed."""

from __future__ import annotations


class MolinkError(Exception):
    """Base class of every error MoLink raises on purpose."""


class InvalidParameterError(MolinkError, ValueError):
    """A request or configuration field is out of its allowed range.

    ``field`` names the offending field so that the HTTP layer can report it as ``param``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ContextLengthExceededError(InvalidParameterError):
    """The prompt (or prompt + max_tokens) does not fit in the model's context."""

    def __init__(self, num_tokens: int, max_model_len: int, what: str = "prompt") -> None:
        super().__init__(
            "max_tokens" if what != "prompt" else "prompt",
            f"this model's maximum context length is {max_model_len} tokens, "
            f"but the {what} needs {num_tokens} tokens",
        )
        self.num_tokens = num_tokens
        self.max_model_len = max_model_len


class UnsupportedArchitectureError(MolinkError, ValueError):
    """config.json names an architecture MoLink has no implementation of."""

    def __init__(self, architectures: list[str] | None, supported: list[str]) -> None:
        super().__init__(
            f"unsupported architecture {architectures!r}; supported: {', '.join(sorted(supported))}"
        )
        self.architectures = architectures
        self.supported = supported


class WeightLoadError(MolinkError):
    """A weight file is missing, truncated, or lacks a tensor this stage needs."""


class ModelNotReadyError(MolinkError):
    """The model (or the pipeline that serves it) cannot take requests yet."""


class OutOfCapacityError(MolinkError):
    """A request can never fit in the KV cache of the smallest stage."""


class PipelineError(MolinkError):
    """A stage failed, timed out, or sent something malformed."""


class ProtocolError(MolinkError, ValueError):
    """A peer sent a message that violates the wire schema or its limits."""
