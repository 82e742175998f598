"""Tool calling for the chat backend: tools in as OpenAI JSON-schema dicts, parsed `ToolCall`s out.

Tools go to the model's own chat template (`apply_chat_template(..., tools=...)`); a template that never reads the
`tools` variable cannot call tools and is refused with `ToolsNotSupported`. Models answer in one of three shapes,
all parsed here:
- Hermes / Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (one block per call);
- Llama 3.1+: a bare JSON object `{"name": ..., "parameters": {...}}` (optionally after `<|python_tag|>`);
- Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]` (the marker is a special token, so the decoded
  text may start straight at the list).
`ToolStream` splits a streamed reply into content that can be shown at once and tool-call text held back until it
parses. `tool_choice` "required" or a named function is enforced by prefilling the start of a call in the model's
own format, so the model can only complete it.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ToolCall", "ToolError", "ToolStream", "ToolsNotSupported", "call_prefix", "check_tool_choice", "check_tools",
    "parse_tool_calls", "supports_tools", "template_messages", "tool_format",
]  # fmt: skip

NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FORMATS = ("hermes", "llama3", "mistral")
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>")


class ToolError(ValueError):
    """A malformed `tools` list or `tool_choice`; the message names the bad entry."""


class ToolsNotSupported(ToolError):
    """The model's chat template has no tool support."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (what the OpenAI API carries)
    id: str = field(default_factory=lambda: "call_" + secrets.token_hex(12))

    def args(self) -> dict[str, Any]:
        return json.loads(self.arguments)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


# ---- checking what comes in -----------------------------------------------------------------------------------
def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Validate an OpenAI `tools` list; returns it normalised to `{"type": "function", "function": {...}}`."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects.")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ToolError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}.")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolError(f"tools[{i}].function.name={name!r}: use 1-64 letters, digits, '_', '.' or '-'.")
        if name in seen:
            raise ToolError(f"tools[{i}]: the function name {name!r} is given twice.")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object.")
        clean = {"name": name, "description": str(fn.get("description") or ""), "parameters": params}
        out.append({"type": "function", "function": clean})
    return out


def check_tool_choice(choice: Any, tools: list[dict[str, Any]]) -> str:
    """'auto', 'none', 'required' or the name of one of `tools`."""
    if choice is None:
        return "auto"
    if isinstance(choice, str) and choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name in {t["function"]["name"] for t in tools}:
            return name
        raise ToolError(f"tool_choice names {name!r}, which is not among the tools given.")
    raise ToolError(f"tool_choice={choice!r}: use 'auto', 'none', 'required' or {{'type': 'function', ...}}.")


def supports_tools(tokenizer: Any) -> bool:
    """True when the chat template reads the `tools` variable (otherwise tools would be silently dropped)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    if not isinstance(template, str):
        return False
    import jinja2
    from jinja2 import meta

    try:
        return "tools" in meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return "tools" in template


def tool_format(tokenizer: Any) -> str:
    """Which call shape the template teaches: 'hermes', 'mistral' or 'llama3'."""
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    return "hermes"


def call_prefix(fmt: str, name: str | None) -> str:
    """The start of a call in `fmt`, prefilled to force a call ('required': any function; `name`: that one)."""
    head = {"hermes": '<tool_call>\n{"name": "', "llama3": '{"name": "', "mistral": '[TOOL_CALLS] [{"name": "'}[fmt]
    if name is None:
        return head
    key = "parameters" if fmt == "llama3" else "arguments"
    return f'{head}{name}", "{key}": '


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> what HF chat templates expect: tool-call arguments as dicts, content never None."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    with contextlib.suppress(ValueError):  # else keep the text; the template shows it as given
                        fn["arguments"] = json.loads(fn["arguments"] or "{}")
                calls.append({**c, "type": "function", "function": fn})
            m["tool_calls"] = calls
        out.append(m)
    return out


# ---- parsing what comes out ------------------------------------------------------------------------------------
def _as_call(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args or "{}")
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_calls(text: str) -> list[ToolCall] | None:
    """A whole text that is one call object, or a list of them; None when it is anything else."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    items = obj if isinstance(obj, list) else [obj]
    calls = [_as_call(x) for x in items]
    return calls if calls and all(calls) else None  # type: ignore[return-value]


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content without the call markup, calls) from a finished reply; ([], text) when it holds no valid call."""
    if "<tool_call>" in text:
        calls, content = [], text
        for block in re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", text, flags=re.S):
            found = _json_calls(block.strip())
            if not found:
                return text, []
            calls += found
        content = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", content, flags=re.S)
        return content.strip(), calls
    for marker in ("[TOOL_CALLS]", "<|python_tag|>"):
        if marker in text:
            before, _, rest = text.partition(marker)
            found = _json_calls(rest.strip())
            return (before.strip(), found) if found else (text, [])
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        found = _json_calls(stripped)
        if found:
            return "", found
    return text, []


class ToolStream:
    """Feed streamed text; get back what may be shown now. Text from a call marker (or a reply that opens with
    '{' or '[') on is held until `finish()`, which parses it; unparseable held text is returned as content."""

    def __init__(self, prefix: str = "") -> None:
        self.text = prefix  # prefilled call start counts as generated text
        self.shown = 0
        self.holding = bool(prefix)

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.holding:
            return ""
        at = min((i for i in (self.text.find(m, self.shown) for m in _MARKERS) if i >= 0), default=-1)
        if at < 0 and not self.text[: self.shown].strip() and self.text.lstrip()[:1] in ("{", "["):
            at = self.shown
        if at >= 0:
            self.holding = True
            out, self.shown = self.text[self.shown : at], at
            return out
        safe = len(self.text) - _partial_marker(self.text)
        out, self.shown = self.text[self.shown : safe], max(self.shown, safe)
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content not yet shown, calls)."""
        rest = self.text[self.shown :]
        content, calls = parse_tool_calls(rest)
        if not calls:
            return rest, []
        return content, calls


def _partial_marker(text: str) -> int:
    """Length of a tail of `text` that could be the start of a call marker (held back, like a stop string)."""
    for k in range(min(max(len(m) for m in _MARKERS) - 1, len(text)), 0, -1):  # never longer than the text
        if any(m.startswith(text[-k:]) for m in _MARKERS):
            return k
    return 0
