"""Tool calls through the running studio's /v1 API, read with the openai client's `chat.completions.stream()`.

No offline model has a tool-calling chat template, so in this module only the token choices are scripted: the
studio runs in-process with the real LLM backend (the SmolLM2 weights leased through the residency manager, its
tokenizer given a Hermes/Qwen-style tool template, the real prompt building, parsing and SSE), and a scripted
decoder emits the tokens of a tool call where the model would choose them.
"""

from __future__ import annotations

import json
import shutil

import pytest

from tests import _llm_support
from tests._studio_server import free_port

openai = pytest.importorskip("openai")
pytestmark = (
    pytest.mark.slow
)  # a studio with real models: minutes on a loaded 2-core CPU (test_api_fast.py runs by default)
llm_ctx = _llm_support.llm_ctx  # session fixture (the converted SmolLM2)

CHAT = "smollm2-135m"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city, from the scripted test station",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
HERMES = (
    "{%- if tools %}<|im_start|>system\nYou may call functions:\n<tools>\n{%- for t in tools %}{{ t | tojson }}\n"
    '{%- endfor %}</tools>\nCall one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>\n'
    "{%- endif %}{%- for m in messages %}<|im_start|>{{ m.role }}\n{%- if m.tool_calls %}{%- for c in m.tool_calls %}"
    "<tool_call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}</tool_call>"
    "{%- endfor %}{%- else %}{{ m.content }}{%- endif %}<|im_end|>\n{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


class ScriptedDecoder:
    """Logits that pick the next token of `script`, then end of sequence; records the prompt it was given."""

    name = "scripted"

    def __init__(self, ids: list[int], eos: int, vocab: int, seen: list) -> None:
        import torch

        self.device = torch.device("cpu")
        self.ids, self.eos, self.vocab, self.seen, self.at = ids, eos, vocab, seen, 0

    def _next(self):
        import torch

        logits = torch.zeros(self.vocab)
        logits[self.ids[self.at] if self.at < len(self.ids) else self.eos] = 100.0  # certain at any temperature
        self.at += 1
        return logits

    def prefill(self, history):
        self.seen.append(history[0].tolist())
        return self._next()

    def step(self, tok):
        return self._next()


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, llm_ctx):
    from backends.llm import LLMBackend
    from studio.app import build_context, launch
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("api-tools")
    settings = Settings(data_dir=root / "data", models_dir=root / "models", port=free_port(), open_browser=False)
    llm = llm_ctx.backends.llm
    converted = llm.model_folder(llm._source(CHAT))
    shutil.copytree(converted, settings.cache_dir / "llm" / converted.name)
    ctx = build_context(settings)

    class ScriptedToolLLM(LLMBackend):
        def __init__(self, ctx):
            super().__init__(ctx)
            self.scripts: list[str] = []
            self.prompts: list[list[int]] = []

        def _tokenizer(self, src):
            tok = super()._tokenizer(src)
            tok.chat_template = HERMES
            return tok

        def _get_decoder(self, key, model, needed, limit):
            tok = self._tokenizers[key]
            ids = tok(self.scripts.pop(0), add_special_tokens=False)["input_ids"]
            return ScriptedDecoder(ids, tok.eos_token_id, model.config.vocab_size, self.prompts)

    backend = ScriptedToolLLM(ctx.core())
    ctx.backends._built["llm"] = backend
    demo = launch(ctx, prevent_thread_lock=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings.port}/v1", api_key="none", max_retries=0)
    yield client, backend
    demo.close()
    ctx.jobs.shutdown(timeout=10)


def test_stream_helper_accumulates_tool_calls(scripted):
    client, backend = scripted
    backend.scripts[:] = ['Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>']
    question = [{"role": "user", "content": "Weather in Paris?"}]
    with client.chat.completions.stream(model=CHAT, messages=question, tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    fragments = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(fragments) > 1 and "".join(e.arguments_delta for e in fragments) == call.function.arguments
    tok = backend._tokenizers["chat:smollm2-135m"]
    assert "from the scripted test station" in tok.decode(backend.prompts[-1])  # the tool reached the template

    backend.scripts[:] = ["It is sunny in Paris."]
    answer = client.chat.completions.create(model=CHAT, tools=[WEATHER], messages=[
        *question, choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'},
    ])  # fmt: skip
    assert answer.choices[0].message.content == "It is sunny in Paris." and answer.choices[0].finish_reason == "stop"
    assert '{"sky": "sunny"}' in tok.decode(backend.prompts[-1])


def test_named_tool_choice_prefills_the_call(scripted):
    client, backend = scripted
    backend.scripts[:] = ['{"city": "Rome"}}\n</tool_call>']
    r = client.chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "Rome?"}], tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Rome"}
    assert r.choices[0].message.content is None
    tok = backend._tokenizers["chat:smollm2-135m"]
    assert tok.decode(backend.prompts[-1]).endswith('<tool_call>\n{"name": "get_weather", "arguments": ')
