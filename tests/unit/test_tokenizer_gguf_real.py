"""The tokenizers of the two packaged GGUF models (SmolLM2's byte-level BPE, Gemma 3's
SentencePiece with byte fallback) against transformers' tokenizer built from the same file,
and streamed detokenization of multi-byte text against the full decode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from molink.sampling_params import SamplingParams
from molink.tokenizer.detokenizer import IncrementalDetokenizer, decode_output
from molink.tokenizer.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "你好，世界。天气很好。",
    "emoji 🤖😀👍🏽🇫🇷 and accents é à ü — € ½",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 and 한국어 テキスト",
    "code: def f(x):\n    return x ** 2  # ok",
    "<|im_start|>user\nhi<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>",
]


def _tokenizer_dir(gguf: Path) -> Path:
    from molink.weights.gguf_source import cached_gguf_tokenizer

    return cached_gguf_tokenizer(gguf)


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any]:
    transformers = pytest.importorskip("transformers")
    if request.param == "smollm2":
        from molink.weights import default_model_gguf

        gguf = default_model_gguf()
    else:
        gguf = request.getfixturevalue("gemma3_gguf")
    reference = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return Tokenizer.from_dir(_tokenizer_dir(gguf)), reference


@pytest.mark.parametrize("text", TEXTS)
def test_encode_and_decode_match_transformers(pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, reference = pair
    for add_special in (True, False):
        ids = ours.encode(text, add_special_tokens=add_special)
        assert ids == reference.encode(text, add_special_tokens=add_special), add_special
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(
                ids, skip_special_tokens=skip
            ), (add_special, skip)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_the_full_decode(pair: tuple[Tokenizer, Any], text: str) -> None:
    """vLLM streams a fast tokenizer's text with tokenizers' DecodeStream, primed with the
    prompt: the output text is the decode of prompt and output past the prompt's decode.
    spaces_between_special_tokens inserts nothing there (it only removes spaces a decoder
    would put between two added tokens, which these decoders never do)."""
    ours, reference = pair
    prompt = ours.encode("Say:", add_special_tokens=True)
    output = ours.encode(text, add_special_tokens=False)
    for skip in (True, False):
        for spaces in (True, False):
            params = SamplingParams(skip_special_tokens=skip, spaces_between_special_tokens=spaces)
            detokenizer = IncrementalDetokenizer(ours, prompt, params)
            deltas = [detokenizer.add_token(t).delta_text for t in output]
            deltas.append(detokenizer.flush().delta_text)
            before = reference.decode(prompt, skip_special_tokens=skip)
            full = reference.decode(prompt + output, skip_special_tokens=skip)
            assert full.startswith(before)
            assert "".join(deltas) == full[len(before) :], (skip, spaces)
            assert decode_output(ours, output, skip) == reference.decode(
                output, skip_special_tokens=skip
            )
            assert not any("\ufffd" in delta for delta in deltas)


def test_multibyte_characters_span_several_tokens(pair: tuple[Tokenizer, Any]) -> None:
    """The streaming test above means something only if some characters are split."""
    ours, _ = pair
    ids = ours.encode("🤖😀👍🏽𝔘𐍈", add_special_tokens=False)
    assert any("\ufffd" in ours.decode([t]) for t in ids)


@pytest.mark.parametrize("stop", ["世界", "🤖😀", "and acc", "x ** 2"])
def test_stop_strings_spanning_tokens(pair: tuple[Tokenizer, Any], stop: str) -> None:
    ours, _ = pair
    text = next(t for t in TEXTS if stop in t)
    output = ours.encode(text, add_special_tokens=False)
    for include in (False, True):
        detokenizer = IncrementalDetokenizer(
            ours, [], SamplingParams(stop=[stop], include_stop_str_in_output=include)
        )
        deltas = []
        for token_id in output:
            deltas.append(detokenizer.add_token(token_id).delta_text)
            if detokenizer.stopped:
                break
        deltas.append(detokenizer.flush().delta_text)
        end = text.index(stop) + (len(stop) if include else 0)
        assert detokenizer.stop_string == stop
        assert "".join(deltas) == text[:end]
