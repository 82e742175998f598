"""Tool calling in the LLM backend: the three call formats, streaming hold-back, checks and template detection."""

from __future__ import annotations

import json

import pytest

from backends.llm.tools import (
    ToolError,
    ToolStream,
    call_prefix,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    supports_tools,
    template_messages,
    tool_format,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.mark.parametrize(
    "text",
    [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',  # Hermes
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.1
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # Llama 3.2 JSON
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',  # Mistral
        ' [{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]',  # Mistral, marker decoded away
    ],
)
def test_each_format_parses_to_one_call(text):
    content, calls = parse_tool_calls(text)
    assert [c.name for c in calls] == ["get_weather"]
    assert calls[0].args() == {"city": "Paris"}
    assert "tool_call" not in content and "get_weather" not in content
    assert calls[0].id.startswith("call_") and calls[0].to_openai()["type"] == "function"


def test_several_hermes_calls_and_plain_text():
    two = "".join(f'<tool_call>{{"name": "f{i}", "arguments": {{"n": {i}}}}}</tool_call>' for i in range(2))
    _, calls = parse_tool_calls(two)
    assert [(c.name, c.args()) for c in calls] == [("f0", {"n": 0}), ("f1", {"n": 1})]
    assert len({c.id for c in calls}) == 2
    assert parse_tool_calls("Paris is the capital.") == ("Paris is the capital.", [])
    broken = '<tool_call>{"name": "f", "arguments": {</tool_call>'
    assert parse_tool_calls(broken) == (broken, [])  # not valid JSON: stays content, never a half call


def test_stream_shows_content_and_holds_the_call():
    stream = ToolStream()
    shown = "".join(stream.feed(p) for p in ["Sure", ", checking", " <tool", '_call>{"name": "get_weather", ',
                                             '"arguments": {"city": "Oslo"}}</tool_call>'])  # fmt: skip
    assert shown == "Sure, checking "
    rest, calls = stream.finish()
    assert rest == "" and calls[0].args() == {"city": "Oslo"}
    plain = ToolStream()
    assert "".join(plain.feed(p) for p in ["a <", "b"]) == "a <b"  # a held '<' is released when it is not a marker
    assert plain.finish() == ("", [])


def test_prefilled_call_is_completed():
    prefix = call_prefix("hermes", "get_weather")
    stream = ToolStream(prefix)
    assert stream.feed('{"city": "Rome"}}\n</tool_call>') == ""
    _, calls = stream.finish()
    assert calls[0].name == "get_weather" and calls[0].args() == {"city": "Rome"}
    assert call_prefix("llama3", "f").endswith('"parameters": ') and call_prefix("mistral", None).startswith("[TOOL")


def test_checks_name_the_bad_value():
    assert check_tools([WEATHER])[0]["function"]["name"] == "get_weather"
    with pytest.raises(ToolError, match="name"):
        check_tools([{"type": "function", "function": {"name": "bad name!"}}])
    with pytest.raises(ToolError, match="twice"):
        check_tools([WEATHER, WEATHER])
    with pytest.raises(ToolError, match="non-empty"):
        check_tools({"name": "x"})
    tools = check_tools([WEATHER])
    assert check_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools) == "get_weather"
    assert check_tool_choice(None, tools) == "auto"
    with pytest.raises(ToolError, match="not among"):
        check_tool_choice({"type": "function", "function": {"name": "other"}}, tools)


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def test_template_detection():
    hermes = "{% if tools %}{% for t in tools %}{{ t | tojson }}{% endfor %}<tool_call>{% endif %}"
    assert supports_tools(_Tok(hermes)) and tool_format(_Tok(hermes)) == "hermes"
    assert not supports_tools(_Tok("{% for m in messages %}{{ m['content'] }}{% endfor %}"))
    assert not supports_tools(_Tok(None))
    assert tool_format(_Tok("{{ '[TOOL_CALLS]' }}{{ tools }}")) == "mistral"
    assert tool_format(_Tok("{{ '<|python_tag|>' }}{{ tools }}")) == "llama3"


def test_template_messages_turn_arguments_into_dicts():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"a": 1})}}
    out = template_messages([{"role": "assistant", "content": None, "tool_calls": [call]}])
    assert out[0]["content"] == "" and out[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1}
