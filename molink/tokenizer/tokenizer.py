"""A Hugging Face tokenizer directory loaded with the ``tokenizers`` library alone.

Importing transformers costs seconds; this loads tokenizer.json directly and reproduces what
transformers' ``AutoTokenizer`` (fast backend) does on top of it, so that token ids, decoded
text and rendered chat templates are the same:

* the named special tokens (bos, eos, ...) and extra special tokens of the config files are
  registered as special added tokens, adding those tokenizer.json lacks;
* the post-processor of tokenizer.json decides which special tokens ``encode`` adds (the
  config's ``add_bos_token``/``add_eos_token`` are ignored when tokenizer.json exists, as
  transformers does);
* truncation and padding stored in tokenizer.json are turned off;
* ``eos_token_ids`` is the union of the config's eos token and generation_config's ids.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import tokenizers

from molink.errors import InvalidParameterError
from molink.tokenizer.chat_template import ChatTemplateRenderer
from molink.tokenizer.files import (
    TOKENIZER_FILE,
    TokenizerFiles,
    TokenizerLoadError,
    TokenSpec,
    read_tokenizer_files,
)

logger = logging.getLogger(__name__)

# transformers' clean_up_tokenization replacements; applied only to non-BPE models, where
# transformers applies them too (for BPE they would corrupt legitimate text).
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


class Tokenizer:
    """Implements ``molink.tokenizer.protocol.TokenizerLike`` for a tokenizer directory.

    ``vocab_size`` counts every id the tokenizer can produce, added tokens included.
    """

    def __init__(self, backend: tokenizers.Tokenizer, files: TokenizerFiles) -> None:
        self._backend = backend
        backend.no_truncation()
        backend.no_padding()
        _register_added_tokens(backend, files)
        added = backend.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, token in added.items() if token.special)
        self.special_tokens: dict[str, str] = {
            name: spec.content for name, spec in files.named_tokens.items()
        }
        self.name_or_path = str(files.directory)
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.bos_token_id = self._optional_id(self.bos_token)
        self.pad_token_id = self._optional_id(self.special_tokens.get("pad_token"))
        eos_ids = [self._optional_id(self.eos_token), *files.generation_eos_token_ids]
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys(i for i in eos_ids if i is not None)
        )
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        model_type = type(backend.model).__name__
        self._clean_up = files.clean_up_tokenization_spaces and model_type != "BPE"
        self._chat = ChatTemplateRenderer(files.chat_template, self.special_tokens)
        self._max_token_chars: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        directory = Path(path)
        files = read_tokenizer_files(directory)
        try:
            backend = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as error:  # the Rust side raises plain Exceptions
            raise TokenizerLoadError(
                f"cannot load {directory / TOKENIZER_FILE}: {error}"
            ) from error
        return cls(backend, files)

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the directory has none."""
        return self._chat.default_template

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise InvalidParameterError("prompt", "must be a string")
        check_unicode(text, "prompt")
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def to_json(self) -> str:
        """tokenizer.json as loaded (added tokens included), e.g. for a grammar engine."""
        return self._backend.to_str()

    @property
    def max_token_chars(self) -> int:
        """The most text characters one token stands for: a prompt longer than
        ``max_model_len * max_token_chars`` cannot fit, whatever it says."""
        if self._max_token_chars is None:
            vocab = self._backend.get_vocab(with_added_tokens=True)
            # Byte-level vocabularies spell each byte as one character, so a token's
            # spelling is never shorter than the text it decodes to.
            self._max_token_chars = max((len(t) for t in vocab), default=1)
        return self._max_token_chars

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self._backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for before, after in _CLEAN_UP_REPLACEMENTS:
                text = text.replace(before, after)
        return text

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        tokens = []
        for token_id in token_ids:
            token = self._backend.id_to_token(token_id)
            if token is None:
                raise InvalidParameterError("token_ids", f"{token_id} is not in the vocabulary")
            tokens.append(token)
        return tokens

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render the conversation to text, as transformers' ``apply_chat_template(...,
        tokenize=False)`` does. Keyword arguments ``tools``, ``documents``, ``chat_template``
        (a template name or a template string) and ``continue_final_message`` have their
        transformers meaning; any other keyword is passed to the template.

        The text already holds the template's special tokens: encode it with
        ``add_special_tokens=False``.
        """
        return self._chat.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def _optional_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)


def check_unicode(text: str, field: str) -> None:
    """Text with lone surrogates (JSON allows "\\ud800") cannot be tokenized: a named 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParameterError(
            field, f"is not valid Unicode text (character {exc.start}: lone surrogate)"
        ) from None


def _register_added_tokens(backend: tokenizers.Tokenizer, files: TokenizerFiles) -> None:
    """Add the config's added tokens tokenizer.json lacks, then make sure every named and
    extra special token is a special added token (transformers does both on load)."""
    for token_id, spec in sorted(files.added_tokens.items()):
        if backend.token_to_id(spec.content) is None:
            new_id = _add(backend, spec, special=spec.special)
            if new_id != token_id:
                logger.warning(
                    "added token %r got id %s, but the config says %s",
                    spec.content,
                    new_id,
                    token_id,
                )
    existing = {token.content: token for token in backend.get_added_tokens_decoder().values()}
    specials = [*files.named_tokens.values(), *files.extra_special_tokens]
    for spec in specials:
        current = existing.get(spec.content)
        if current is not None and current.special:
            continue
        if current is not None:
            # Keep the stripping/normalisation behaviour tokenizer.json gives the token.
            spec = TokenSpec(
                content=current.content,
                lstrip=current.lstrip,
                rstrip=current.rstrip,
                normalized=current.normalized,
                single_word=current.single_word,
            )
        _add(backend, spec, special=True)


def _add(backend: tokenizers.Tokenizer, spec: TokenSpec, special: bool) -> int | None:
    token = tokenizers.AddedToken(
        spec.content,
        single_word=spec.single_word,
        lstrip=spec.lstrip,
        rstrip=spec.rstrip,
        normalized=spec.normalized,
        special=special,
    )
    if special:
        backend.add_special_tokens([token])
    else:
        backend.add_tokens([token])
    return backend.token_to_id(spec.content)
