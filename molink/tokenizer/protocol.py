"""The tokenizer surface the engine and the API rely on."""

from __future__ import annotations

from typing import Any, Protocol


class TokenizerLike(Protocol):
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    vocab_size: int
    max_token_chars: int  # most characters of text one token covers
    name_or_path: str  # the folder it was loaded from

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]: ...

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str: ...

    def is_special(self, token_id: int) -> bool: ...
