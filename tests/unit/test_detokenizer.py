"""Incremental detokenizer: streamed deltas add up to the full decode; stop strings."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers

from molink.sampling_params import SamplingParams
from molink.tokenizer.detokenizer import (
    DetokenizerStep,
    IncrementalDetokenizer,
    decode_output,
    partial_stop_length,
)
from molink.tokenizer.files import TokenizerFiles, TokenSpec
from molink.tokenizer.tokenizer import Tokenizer
from tests.unit.test_tokenizer import build_tokenizer_dir

torch.set_num_threads(1)

CHAR_POOL = (
    list("abc xyz.,!?\n") + list("你好世界天气很") + ["🤖", "😀", "👍🏽", "🇫🇷", "é", "—", "€"]
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_dir(build_tokenizer_dir(tmp_path_factory.mktemp("detok")))


def stream(
    tokenizer: Tokenizer,
    output_ids: list[int],
    prompt_ids: list[int] | None = None,
    **params: object,
) -> tuple[list[DetokenizerStep], IncrementalDetokenizer]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids or [], SamplingParams(**params))
    steps = [detokenizer.add_token(token_id) for token_id in output_ids]
    steps.append(detokenizer.flush())
    return steps, detokenizer


def joined(steps: list[DetokenizerStep]) -> str:
    return "".join(step.delta_text for step in steps)


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(CHAR_POOL) for _ in range(length))


def test_multibyte_characters_are_never_split(tokenizer: Tokenizer) -> None:
    rng = random.Random(0)
    splits = 0
    for _ in range(200):
        text = random_text(rng, rng.randint(1, 40))
        ids = tokenizer.encode(text, add_special_tokens=False)
        splits += sum("\ufffd" in tokenizer.decode([i]) for i in ids)
        prompt = tokenizer.encode(random_text(rng, 5), add_special_tokens=False)
        steps, detokenizer = stream(tokenizer, ids, prompt)
        assert all("\ufffd" not in step.delta_text for step in steps)
        assert joined(steps) == text == tokenizer.decode(ids) == detokenizer.text
    assert splits > 50  # the vocabulary really splits characters across tokens


@pytest.mark.parametrize("skip", [True, False])
@pytest.mark.parametrize("spaces", [True, False])
def test_random_token_sequences_add_up_to_the_full_decode(
    tokenizer: Tokenizer, skip: bool, spaces: bool
) -> None:
    rng = random.Random(1)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 30))]
        prompt = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 8))]
        steps, _ = stream(
            tokenizer,
            ids,
            prompt,
            skip_special_tokens=skip,
            spaces_between_special_tokens=spaces,
        )
        expected = decode_output(tokenizer, ids, skip)
        # A sequence that ends inside a character ends before it (no trailing U+FFFD): a
        # byte-fallback decoder shows the run of byte tokens it ends in as U+FFFD whole,
        # the held-back context character included (up to 4 + 3 bytes).
        for _ in range(7):
            expected = expected.removesuffix("\ufffd")
        assert joined(steps) == expected


def test_a_cut_inside_a_character_does_not_end_in_a_replacement_char(
    tokenizer: Tokenizer,
) -> None:
    split = next(
        ids
        for ids in (
            tokenizer.encode(f"ok {chr(c)}", add_special_tokens=False)
            for c in range(0x4E00, 0x9FFF)
        )
        if "\ufffd" in tokenizer.decode(ids[:-1])  # the character spans several tokens
    )
    steps, detokenizer = stream(tokenizer, split[:-1], [])
    assert joined(steps) == detokenizer.text
    assert not detokenizer.text.endswith("\ufffd")
    assert detokenizer.text.startswith("ok")


def test_special_tokens_and_spacing(tokenizer: Tokenizer) -> None:
    hello = tokenizer.encode("Hello", add_special_tokens=False)
    world = tokenizer.encode(" world", add_special_tokens=False)
    ids = hello + [2] + world + [0, 1]
    assert joined(stream(tokenizer, ids)[0]) == "Hello world"
    kept = stream(tokenizer, ids, skip_special_tokens=False, spaces_between_special_tokens=False)
    assert joined(kept[0]) == "Hello<|im_end|> world<|endoftext|><|im_start|>"
    assert joined(kept[0]) == tokenizer.decode(ids, skip_special_tokens=False)
    # As vLLM's detokenizer for fast tokenizers: no spaces are inserted around special
    # tokens (slow tokenizers inserted them).
    spaced = stream(tokenizer, ids, skip_special_tokens=False)
    assert joined(spaced[0]) == "Hello<|im_end|> world<|endoftext|><|im_start|>"


def test_deltas_follow_the_prompt_context(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    ids = tokenizer.encode("Sure, 你好!", add_special_tokens=False)
    steps, _ = stream(tokenizer, ids, prompt)
    assert joined(steps) == "Sure, 你好!"


def metaspace_tokenizer() -> Tokenizer:
    """A sentencepiece-style vocabulary whose decoder drops the first token's leading space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁Hello": 3, "▁world": 4, "!": 5, "▁The": 6}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    files = TokenizerFiles(
        directory=Path("."),
        named_tokens={"bos_token": TokenSpec("<s>"), "eos_token": TokenSpec("</s>")},
    )
    return Tokenizer(backend, files)


def test_leading_spaces_survive_windowing_and_skipped_specials() -> None:
    tokenizer = metaspace_tokenizer()
    assert tokenizer.decode([3, 4]) == "Hello world"
    # After the prompt, the first output word keeps its space, as in vLLM.
    assert joined(stream(tokenizer, [3, 4, 5], prompt_ids=[1, 6])[0]) == " Hello world!"
    # A skipped special token between words must not eat the following space.
    assert joined(stream(tokenizer, [3, 2, 4, 2, 2, 4])[0]) == tokenizer.decode([3, 2, 4, 2, 2, 4])


class CountingTokenizer:
    """Wraps a tokenizer and counts the tokens handed to decode."""

    def __init__(self, inner: Tokenizer) -> None:
        self.inner = inner
        self.decoded_tokens = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded_tokens += len(token_ids)
        return self.inner.decode(token_ids, skip_special_tokens)


def test_work_per_token_does_not_grow_with_the_output(tokenizer: Tokenizer) -> None:
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer.encode("你好 world 🤖 " * 300, add_special_tokens=False)
    steps, _ = stream(counting, ids)  # type: ignore[arg-type]
    assert joined(steps) == tokenizer.decode(ids)
    assert counting.decoded_tokens < 12 * len(ids)


def misaligned_tokenizer(text: str) -> tuple[Tokenizer, list[int]]:
    """A byte-level vocabulary whose tokens straddle characters: every token ends with the
    first byte of the next character, so no token boundary is a character boundary."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_to_char: dict[int, str] = {}
    for ch in text:
        mapped = byte_level.pre_tokenize_str(ch)[0][0]
        byte_to_char.update(zip(ch.encode(), mapped, strict=True))
    data = text.encode()
    pieces = [data[:1]] + [data[i : i + 3] for i in range(1, len(data), 3)]
    vocab: dict[str, int] = {"<unk>": 0}
    ids = []
    for piece in pieces:
        token = "".join(byte_to_char[b] for b in piece)
        ids.append(vocab.setdefault(token, len(vocab)))
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.decoder = decoders.ByteLevel()
    return Tokenizer(backend, TokenizerFiles(directory=Path("."))), ids


def test_tokens_that_never_end_on_a_character_boundary() -> None:
    text = "你好世界天气很好" * 20
    tokenizer, ids = misaligned_tokenizer(text)
    assert all(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    counting = CountingTokenizer(tokenizer)
    steps, _ = stream(counting, ids)  # type: ignore[arg-type]
    assert joined(steps) == text
    assert all("\ufffd" not in step.delta_text for step in steps)
    # Each token completes the previous character, which is released at once.
    assert [len(step.delta_text) for step in steps] == [0] + [1] * (len(ids) - 1) + [0]
    assert counting.decoded_tokens < 50 * len(ids)


def stop_stream(
    tokenizer: Tokenizer, text: str, **params: object
) -> tuple[list[DetokenizerStep], IncrementalDetokenizer]:
    # One token per character makes the token boundaries explicit.
    ids = [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]
    return stream(tokenizer, ids, **params)


def test_stop_string_across_tokens_truncates_the_text(tokenizer: Tokenizer) -> None:
    steps, detokenizer = stop_stream(tokenizer, "Hello world STOP and more", stop=["STOP"])
    assert joined(steps) == "Hello world " == detokenizer.text
    assert detokenizer.stop_string == "STOP" and detokenizer.stopped
    assert [s.stop_string for s in steps if s.stop_string] == ["STOP"]
    # Before the match, no delta ever showed the beginning of the stop string.
    released = ""
    for step in steps:
        released += step.delta_text
        assert "S" not in released


def test_stop_string_can_be_included(tokenizer: Tokenizer) -> None:
    steps, detokenizer = stop_stream(
        tokenizer, "Hello world STOP and more", stop=["STOP"], include_stop_str_in_output=True
    )
    assert joined(steps) == "Hello world STOP" == detokenizer.text


def test_tokens_after_a_stop_are_ignored(tokenizer: Tokenizer) -> None:
    steps, detokenizer = stop_stream(tokenizer, "abSTOPcd", stop=["STOP"])
    assert (
        detokenizer.add_token(tokenizer.encode("x", add_special_tokens=False)[0]).delta_text == ""
    )
    assert detokenizer.flush() == DetokenizerStep("")
    assert detokenizer.text == "ab"


def test_partial_stop_is_held_then_released(tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=["STOP"]))
    deltas = [
        detokenizer.add_token(i).delta_text
        for i in tokenizer.encode("abST", add_special_tokens=False)
    ]
    assert "".join(deltas) == "ab"
    # The held text turned out not to be a stop: it is released as soon as that is clear.
    assert (
        detokenizer.add_token(tokenizer.encode("x", add_special_tokens=False)[0]).delta_text
        == "STx"
    )
    detokenizer.add_token(tokenizer.encode("S", add_special_tokens=False)[0])
    assert detokenizer.flush().delta_text == "S"
    assert detokenizer.text == "abSTxS" and not detokenizer.stopped


def test_earliest_stop_wins_and_multibyte_stops_match(tokenizer: Tokenizer) -> None:
    steps, detokenizer = stop_stream(tokenizer, "一二 你好世界 end", stop=["end", "好世"])
    assert joined(steps) == "一二 你" and detokenizer.stop_string == "好世"
    steps, detokenizer = stop_stream(tokenizer, "xx ab yy", stop=["b yy", "ab"])
    assert joined(steps) == "xx " and detokenizer.stop_string == "ab"


def test_stop_strings_wait_for_min_tokens(tokenizer: Tokenizer) -> None:
    steps, detokenizer = stop_stream(tokenizer, "ab,cd,ef", stop=[","], min_tokens=3)
    assert joined(steps) == "ab,cd" and detokenizer.stop_string == ","


def test_partial_stop_length() -> None:
    assert partial_stop_length("hello wor", ["world"], 5) == 3
    assert partial_stop_length("hello", ["lo!", "llo?"], 4) == 3
    assert partial_stop_length("hello", ["xyz"], 3) == 0
    assert partial_stop_length("abc", ["c"], 1) == 0  # a full match is not a partial one


def test_a_token_of_plain_text_costs_two_decodes(
    tokenizer: Tokenizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each step decodes its window and, sliding, the new one-token window once: the
    slide's checks and its measure of that window reuse the same decode."""
    text = "abc xyz. abc, xyz! " * 20
    ids = tokenizer.encode(text, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    calls = 0
    decode = tokenizer.decode

    def counting(token_ids: list[int], skip_special_tokens: bool = True) -> str:
        nonlocal calls
        calls += 1
        return decode(token_ids, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tokenizer, "decode", counting)
    deltas = [detokenizer.add_token(token_id).delta_text for token_id in ids]
    assert "".join(deltas) + detokenizer.flush().delta_text == text
    assert calls <= 2 * len(ids) + 1
