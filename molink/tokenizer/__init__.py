"""Tokenization, chat templates and incremental detokenization."""

from molink.tokenizer.chat_template import ChatTemplateError
from molink.tokenizer.detokenizer import DetokenizerStep, IncrementalDetokenizer, decode_output
from molink.tokenizer.files import TokenizerLoadError
from molink.tokenizer.protocol import TokenizerLike
from molink.tokenizer.tokenizer import Tokenizer

__all__ = [
    "ChatTemplateError",
    "DetokenizerStep",
    "IncrementalDetokenizer",
    "Tokenizer",
    "TokenizerLike",
    "TokenizerLoadError",
    "decode_output",
]
