"""Tokenizer: ids, text and chat templates equal transformers' AutoTokenizer on the same directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from molink.tokenizer.chat_template import ChatTemplateError
from molink.tokenizer.files import TokenizerLoadError
from molink.tokenizer.tokenizer import Tokenizer

torch.set_num_threads(1)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises what templates in the wild use: bos_token, tools and tojson, namespaces, loop
# controls, raise_exception, strftime_now, reasoning fields and {% generation %} blocks.
RICH_TEMPLATE = """{{ bos_token }}
{%- set ns = namespace(system='') -%}
{%- if tools -%}
Tools: {{ tools | tojson }} / {{ tools | tojson(indent=2) }}
{% endif -%}
{%- for message in messages -%}
  {%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] -%}{%- continue -%}{%- endif -%}
  {%- if message['role'] not in ['user', 'assistant', 'tool'] -%}
    {{ raise_exception('unknown role ' + message['role']) }}
  {%- endif -%}
  [{{ message['role'] }}]{% if ns.system %}({{ ns.system }}){% endif %}
  {%- if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}
  {%- if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
  {%- else %}{{ message['content'] }}{% endif %}
  {%- if message.get('tool_calls') %} calls={{ message['tool_calls'] | tojson }}{% endif %}
  {%- if message['content'] == 'STOP' %}{% break %}{% endif %}
{% endfor -%}
{%- if add_generation_prompt %}[assistant]{% endif %}
{%- if custom_flag is defined %} flag={{ custom_flag }}{% endif %} year={{ strftime_now('%Y') }}"""

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog. 0123456789",
    "你好世界，我是一个语言模型。今天天气很好。",
    "I love 🤖 and 😀 emoji 👍🏽 and flags 🇫🇷!",
    "Café naïve résumé — “quotes” and ‘single’ ... tabs\tand\nnewlines",
]


def build_backend(vocab_size: int = 600, bos_post_processor: bool = False) -> BackendTokenizer:
    """A small byte-level BPE trained on a corpus with multi-byte characters, whose merges
    split some characters across tokens."""
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 20, trainer)
    if bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
        )
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return backend


def build_tokenizer_dir(
    directory: Path,
    config: dict[str, Any] | None = None,
    generation_eos: Any = None,
    bos_post_processor: bool = False,
) -> Path:
    """A tokenizer directory as found on the hub: tokenizer.json plus JSON config files."""
    directory.mkdir(parents=True, exist_ok=True)
    build_backend(bos_post_processor=bos_post_processor).save(str(directory / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    tokenizer_config.update(config or {})
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    if generation_eos is not None:
        (directory / "generation_config.json").write_text(
            json.dumps({"eos_token_id": generation_eos})
        )
    return directory


SAMPLE_TEXTS = [
    "Hello world",
    " leading space and  double  spaces ",
    "digits 1234567890 and 3.14159",
    "你好世界，今天天气很好",
    "emoji 🤖😀👍🏽🇫🇷 mixed with text",
    "special <|im_start|>user\nhi<|im_end|> inside",
    "Café naïve résumé — “quotes”",
    "tabs\tand\nnewlines\r\n",
    "",
]

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "你好 🤖"},
        {"role": "assistant", "content": "Hi there.", "reasoning_content": "greet back"},
        {"role": "user", "content": "More?"},
    ],
    [
        {"role": "user", "content": "Call a tool", "name": None},
        {
            "role": "assistant",
            "content": "ok",
            "tool_calls": [{"name": "f", "arguments": {"x": "<é>"}}],
        },
        {"role": "tool", "content": "42"},
        {"role": "user", "content": "STOP"},
        {"role": "user", "content": "never rendered"},
    ],
]


@pytest.fixture(scope="module")
def auto_tokenizer_cls() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tokenizer_dir(
        tmp_path_factory.mktemp("hub"),
        config={"chat_template": RICH_TEMPLATE},
        generation_eos=[2, 0],
        bos_post_processor=True,
    )


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory: pytest.TempPathFactory, auto_tokenizer_cls: Any) -> Path:
    """A directory written by transformers' save_pretrained."""
    from transformers import PreTrainedTokenizerFast

    backend = build_backend()
    backend.add_tokens([AddedToken("<tool>", special=False)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        extra_special_tokens=["<extra_special>"],
        chat_template=CHATML_TEMPLATE,
    )
    directory = tmp_path_factory.mktemp("saved")
    fast.save_pretrained(directory)
    return directory


def compare_with_transformers(directory: Path, auto_tokenizer_cls: Any) -> None:
    ours = Tokenizer.from_dir(directory)
    theirs = auto_tokenizer_cls.from_pretrained(str(directory))
    for text in SAMPLE_TEXTS:
        for add_special_tokens in (True, False):
            ids = ours.encode(text, add_special_tokens=add_special_tokens)
            assert ids == theirs.encode(text, add_special_tokens=add_special_tokens), text
        ids = theirs.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                ids, skip_special_tokens=skip
            )
        assert ours.convert_ids_to_tokens(ids) == theirs.convert_ids_to_tokens(ids)
    assert ours.vocab_size == len(theirs)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token == theirs.eos_token
    assert theirs.eos_token_id in ours.eos_token_ids
    assert ours.special_token_ids == set(theirs.all_special_ids) | {
        i for i, t in theirs.added_tokens_decoder.items() if t.special
    }
    if theirs.chat_template is None:
        return
    for messages in CONVERSATIONS[:2]:
        for add_generation_prompt in (True, False):
            assert ours.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            ) == theirs.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )


def test_hub_directory_matches_transformers(hub_dir: Path, auto_tokenizer_cls: Any) -> None:
    compare_with_transformers(hub_dir, auto_tokenizer_cls)


def test_saved_directory_matches_transformers(saved_dir: Path, auto_tokenizer_cls: Any) -> None:
    compare_with_transformers(saved_dir, auto_tokenizer_cls)
    tokenizer = Tokenizer.from_dir(saved_dir)
    extra = tokenizer.token_to_id("<extra_special>")
    tool = tokenizer.token_to_id("<tool>")
    assert extra is not None and tokenizer.is_special(extra)
    assert tool is not None and not tokenizer.is_special(tool)


def test_smollm_directory_matches_transformers(smollm_dir: Path, auto_tokenizer_cls: Any) -> None:
    # The default model's tokenizer as MoLink converts it from the GGUF (conftest's
    # smollm_dir: converted in this run when the cache is empty, as on a fresh machine).
    compare_with_transformers(smollm_dir, auto_tokenizer_cls)


def test_rich_chat_templates_match_transformers(hub_dir: Path, auto_tokenizer_cls: Any) -> None:
    ours = Tokenizer.from_dir(hub_dir)
    theirs = auto_tokenizer_cls.from_pretrained(str(hub_dir))
    tools = [{"type": "function", "function": {"name": "f", "description": "ünïcode <b>"}}]
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"tools": tools}, {"custom_flag": "yes"}):
            for add_generation_prompt in (True, False):
                expected = theirs.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
                )
                rendered = ours.apply_chat_template(
                    messages, add_generation_prompt=add_generation_prompt, **kwargs
                )
                assert rendered == expected


def test_continue_final_message_matches_transformers(
    hub_dir: Path, auto_tokenizer_cls: Any
) -> None:
    ours = Tokenizer.from_dir(hub_dir)
    theirs = auto_tokenizer_cls.from_pretrained(str(hub_dir))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}]
    expected = theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=False, continue_final_message=True
    )
    rendered = ours.apply_chat_template(
        messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == expected
    assert rendered.endswith("[assistant]Well, ")


def test_eos_ids_are_the_union_of_config_and_generation_config(hub_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(hub_dir)
    assert tokenizer.eos_token_ids == (2, 0)
    assert tokenizer.bos_token_id == 1
    assert tokenizer.encode("hi")[0] == 1
    assert tokenizer.encode("hi", add_special_tokens=False)[0] != 1


def test_special_tokens_map_matches_transformers(tmp_path: Path, auto_tokenizer_cls: Any) -> None:
    directory = build_tokenizer_dir(tmp_path)
    special_map = {"eos_token": "<|endoftext|>", "additional_special_tokens": ["<new>"]}
    (directory / "special_tokens_map.json").write_text(json.dumps(special_map))
    compare_with_transformers(directory, auto_tokenizer_cls)
    assert Tokenizer.from_dir(directory).eos_token == "<|endoftext|>"


def test_special_tokens_map_supplies_missing_eos(tmp_path: Path) -> None:
    directory = build_tokenizer_dir(tmp_path, config={"eos_token": None}, generation_eos=0)
    (directory / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": {"content": "<|im_end|>", "special": True}})
    )
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == (2, 0)


def test_raise_exception_becomes_a_named_error(hub_dir: Path) -> None:
    tokenizer = Tokenizer.from_dir(hub_dir)
    with pytest.raises(ChatTemplateError, match="unknown role robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_template_failures_on_unexpected_content_are_named(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_dir(build_tokenizer_dir(tmp_path))
    parts = [{"type": "text", "text": "x"}]  # the ChatML template concatenates strings
    with pytest.raises(ChatTemplateError):
        tokenizer.apply_chat_template([{"role": "user", "content": parts}])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace(_private=1) %}{{ ns._private }}",
        "{{ namespace.__init__.__globals__ }}",
        "{% for %}",
    ],
)
def test_unsafe_or_broken_templates_are_refused(hub_dir: Path, template: str) -> None:
    tokenizer = Tokenizer.from_dir(hub_dir)
    with pytest.raises(ChatTemplateError):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)


def test_named_templates_and_missing_template(tmp_path: Path) -> None:
    templates = [
        {"name": "default", "template": "default:{{ messages[0]['content'] }}"},
        {"name": "tool_use", "template": "tools:{{ tools | length }}"},
    ]
    tokenizer = Tokenizer.from_dir(
        build_tokenizer_dir(tmp_path / "a", {"chat_template": templates})
    )
    messages = [{"role": "user", "content": "x"}]
    assert tokenizer.apply_chat_template(messages) == "default:x"
    assert tokenizer.apply_chat_template(messages, tools=[{"a": 1}]) == "tools:1"
    assert tokenizer.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "tools:0"
    bare = Tokenizer.from_dir(build_tokenizer_dir(tmp_path / "b", {"chat_template": None}))
    assert bare.chat_template is None
    with pytest.raises(ChatTemplateError):
        bare.apply_chat_template(messages)
    with pytest.raises(ChatTemplateError):
        tokenizer.apply_chat_template([])


def test_template_file_takes_priority_over_config(tmp_path: Path) -> None:
    directory = build_tokenizer_dir(tmp_path)
    (directory / "chat_template.jinja").write_text("from file: {{ messages | length }}")
    tokenizer = Tokenizer.from_dir(directory)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "from file: 1"


def test_broken_directories_raise_load_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerLoadError):
        Tokenizer.from_dir(tmp_path)
    directory = build_tokenizer_dir(tmp_path / "bad_config")
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError):
        Tokenizer.from_dir(directory)
    directory = build_tokenizer_dir(tmp_path / "bad_tokenizer")
    (directory / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerLoadError):
        Tokenizer.from_dir(directory)
