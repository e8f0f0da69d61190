"""Tool calls and tool results in the history render as transformers renders them."""

from __future__ import annotations

import json

from molink.api.chat_render import to_template_messages
from molink.api.schemas import ChatMessage, Tool
from molink.tokenizer.tokenizer import Tokenizer

# The shape of Qwen 2.5's tool template, trimmed.
TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n<tools>{% for tool in tools %}\n{{ tool | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant\n"
    '{% for tc in message.tool_calls %}<tool_call>\n{"name": "{{ tc.function.name }}", '
    '"arguments": {{ tc.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}"
    "\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ARGS = {"city": "Paris"}
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps(ARGS)},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"c": 21}'},
]


def test_tool_history_renders_as_transformers_does(smollm_dir) -> None:
    import transformers

    ours = Tokenizer.from_dir(smollm_dir).apply_chat_template(
        to_template_messages([ChatMessage.model_validate(m) for m in HISTORY]),
        add_generation_prompt=True,
        chat_template=TEMPLATE,
        tools=[Tool.model_validate(t).model_dump(exclude_none=True) for t in TOOLS],
    )
    # transformers takes the arguments as a mapping (OpenAI clients send a JSON string).
    reference_history = json.loads(json.dumps(HISTORY))
    reference_history[1]["tool_calls"][0]["function"]["arguments"] = ARGS
    reference_history[1]["content"] = ""
    reference = transformers.AutoTokenizer.from_pretrained(str(smollm_dir)).apply_chat_template(
        reference_history, tools=TOOLS, chat_template=TEMPLATE, add_generation_prompt=True,
        tokenize=False,
    )  # fmt: skip
    assert ours == reference
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours
