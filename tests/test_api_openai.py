"""Every /v1 route with the official openai client, against real models, in the default suite (fast).

One in-process server for the module: the studio's own context and routes (`studio.api.mount`) on uvicorn in a
thread, on the offline defaults (SmolLM2-135M converted once per session, all-MiniLM-L6-v2, Whisper tiny.en, the
untrained demo diffusion pipeline), keys required on loopback. tests/test_api.py runs the same checks against a
launched `python -m studio.app` subprocess (slow); tests/test_api_fast.py the queue, 503 and disconnect paths.

Tool calls through a real model: no offline model has a tool template, so `tiny-tool-demo` is an untrained demo
model (a 2-layer Llama of width 96 with SmolLM2's tokenizer) given a Qwen2.5-style tool template (written here in
Qwen2.5's shape: tools in a system block, `<tool_call>` JSON, results as `<tool_response>` in a user turn) and
taught, in a few seconds of training on exactly the prompts the backend renders, two replies: call get_weather for
Lima, then answer from the tool's result. The studio then runs it as any local model: the real template, real
greedy decoding, the real parser and SSE; the test executes the call and sends the result back.
"""

from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest

from tests import _llm_support
from tests._studio_server import REPO

openai = pytest.importorskip("openai")
llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures

KEY = "sk-openai-0123456789abcdef"
CHAT, TOOL_MODEL = "smollm2-135m", "tiny-tool-demo"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}  # fmt: skip
ASK = [{"role": "user", "content": "What is the weather in Lima?"}]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
RESULT = '{"city": "Lima", "temp_c": 19, "sky": "cloudy"}'
ANSWER = "It is 19 degrees and cloudy in Lima."
QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n"
    "{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}\n\n# Tools\n\n"
    "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content or '' }}"
    "{%- for c in m.tool_calls or [] %}{%- if loop.first and m.content %}\n{%- endif %}"
    '<tool_call>\n{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{%- endif %}"
    "\n<tool_response>\n{{ m.content }}\n</tool_response>"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


def _tool_round_trip_prompts(tok) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids) of the two turns, rendered by the backend's own code (template_messages +
    render_ids with the checked tools), so training sees exactly what the server will feed the model."""
    from backends.llm.generate import render_ids
    from backends.llm.tools import check_tools, template_messages

    tools = check_tools([WEATHER])
    call = {"id": "call_x", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lima"}'}}  # fmt: skip
    second = [*ASK, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "tool_call_id": "call_x", "content": RESULT}]  # fmt: skip
    out = []
    for msgs, reply in ((ASK, CALL_TEXT), (second, ANSWER)):
        prompt = render_ids(tok, template_messages(msgs), tools=tools)
        out.append((prompt, tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]))
    return out


def teach_tool_model(folder, smol, max_steps: int = 300):
    """The untrained demo model, taught the two replies: the embeddings stay random (frozen), the layers and the
    head learn; loss on the reply tokens only, the head applied to those positions only."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    _llm_support.make_tiny_llama(folder, smol, hidden=64)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = QWEN_STYLE
    model = LlamaForCausalLM.from_pretrained(folder)
    model.model.embed_tokens.requires_grad_(False)
    pairs = _tool_round_trip_prompts(tok)
    batch = [(torch.tensor([p + r[:-1]]), len(p) - 1, torch.tensor(r)) for p, r in pairs]
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(0)
    for step in range(max_steps):
        loss = sum(torch.nn.functional.cross_entropy(model.lm_head(model.model(input_ids=ids).last_hidden_state[0, at:]),
                                                     target) for ids, at, target in batch)  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4 and _greedy_ok(model, batch):
            break
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _greedy_ok(model, batch) -> bool:
    import torch

    with torch.no_grad():
        return all(torch.equal(model(input_ids=ids).logits[0, at:].argmax(-1), target) for ids, at, target in batch)


@pytest.fixture(scope="module")
def server(tmp_path_factory, llm_ctx, smol_folder, shared_cache_dir):
    from backends.image.tiny import ensure_tiny_pipeline
    from studio.app import build_context
    from studio.bench.api import serve
    from studio.settings import Settings

    root = tmp_path_factory.mktemp("api-openai")
    (root / "keys.txt").write_text(f"# keys\n{KEY}\n")
    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False,
                        api_keys_file=root / "keys.txt", api_keys_on_loopback=True)  # fmt: skip
    shutil.copytree(smol_folder, settings.cache_dir / "llm" / smol_folder.name)
    demo = ensure_tiny_pipeline(shared_cache_dir, "tiny-sd-demo")
    shutil.copytree(demo, settings.cache_dir / "diffusion" / demo.name)
    ctx = build_context(settings)
    url, srv = serve(ctx)  # the studio's routes on uvicorn in a thread (what the API bench uses)
    yield url, ctx
    srv.should_exit = True
    ctx.jobs.shutdown(timeout=10)


@pytest.fixture(scope="module")
def tool_model(server, smol_folder, shared_cache_dir):
    """The taught demo model in the models folder, chosen as the chat model (as in the Chat tab), so it is served."""
    taught = shared_cache_dir / TOOL_MODEL
    if not (taught / "config.json").is_file():
        teach_tool_model(taught, smol_folder)
    ctx = server[1]
    shutil.copytree(taught, ctx.settings.models_dir / TOOL_MODEL)
    ctx.backends.llm.configure(model_id=TOOL_MODEL)
    return TOOL_MODEL


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key=KEY, max_retries=0, timeout=120)


def test_models_and_a_wrong_key(server, client):
    ids = {m.id for m in client.models.list()}
    assert {CHAT, "all-minilm-l6-v2", "whisper-tiny.en", "tiny-sd-demo"} <= ids
    wrong = openai.OpenAI(base_url=server[0], api_key="sk-wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_chat_plain_and_streamed_with_usage(client):
    plain = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=8, temperature=0)
    assert "Paris" in plain.choices[0].message.content
    chunks = list(client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_text_completion_plain_and_streamed(client):
    plain = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0)
    text = plain.choices[0].text
    assert text.strip() and plain.usage.completion_tokens >= 1 and plain.choices[0].finish_reason in ("stop", "length")
    streamed = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=6, temperature=0,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_embeddings_in_both_encodings(server, client):
    texts = ["The cat sat on the mat.", "A kitten rests on a rug.", "Quarterly tax filing deadlines."]
    f = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    vec = np.array([d.embedding for d in f.data])
    assert vec.shape == (3, 384) and vec[0] @ vec[1] > vec[0] @ vec[2] + 0.2
    raw = httpx.post(server[0] + "/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "all-minilm-l6-v2", "input": texts, "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.allclose(decoded, vec, atol=1e-6)


def test_shipped_clip_as_srt(client):
    with (REPO / "assets" / "audio" / "one-sentence.mp3").open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,") and " --> " in srt and "airport" in srt.lower()


def test_image_from_the_demo_pipeline(client):
    from PIL import Image

    r = client.images.generate(model="tiny-sd-demo", prompt="a lighthouse", size="64x64", n=1,
                               extra_body={"steps": 2, "seed": 3})  # fmt: skip
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).size == (64, 64)


@pytest.mark.slow  # teaching the demo model takes 40 steps: ~10 s alone, minutes on a loaded 2-core CPU
def test_tool_call_round_trip_through_a_real_model(client, tool_model):
    """parse -> call -> result -> answer: streamed, accumulated by the client's stream helper."""
    with client.chat.completions.stream(model=TOOL_MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                        max_tokens=60) as s:  # fmt: skip
        events = list(s)
        final = s.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and not (choice.message.content or "").strip()
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Lima"}
    assert any(e.type == "tool_calls.function.arguments.done" for e in events)

    def get_weather(city: str) -> str:  # the client's side of the call
        return RESULT if city == "Lima" else "{}"

    follow = [
        *ASK,
        {"role": "assistant", "content": choice.message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": get_weather(**json.loads(call.function.arguments))},
    ]
    answer = client.chat.completions.create(model=TOOL_MODEL, messages=follow, tools=[WEATHER], temperature=0,
                                            max_tokens=60)  # fmt: skip
    assert answer.choices[0].finish_reason == "stop" and not answer.choices[0].message.tool_calls
    assert answer.choices[0].message.content.strip() == ANSWER
