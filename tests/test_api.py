"""The /v1 API of the running studio (`python -m studio.app` in a subprocess), driven by the official openai client.

One studio for the module, on the offline defaults, with API keys required on loopback and a queue bound of one
waiting request per kind, so the 401 and 503 paths can be reached.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from tests import _llm_support
from tests._studio_server import REPO, running_studio

openai = pytest.importorskip("openai")
pytestmark = (
    pytest.mark.slow
)  # a studio with real models: minutes on a loaded 2-core CPU (test_api_fast.py runs by default)
llm_ctx = _llm_support.llm_ctx  # session fixture (the converted SmolLM2)

KEY = "sk-test-0123456789abcdef"
CHAT = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def studio(tmp_path_factory, llm_ctx):
    workdir = tmp_path_factory.mktemp("api")
    (workdir / "keys.txt").write_text(f"# API keys\n{KEY}\n")
    (workdir / "studio.toml").write_text('api_keys_file = "keys.txt"\napi_keys_on_loopback = true\napi_max_queue = 1\n')
    llm = llm_ctx.backends.llm
    converted = llm.model_folder(llm._source(CHAT))  # converted once per session, copied in
    shutil.copytree(converted, workdir / "data" / "cache" / "llm" / converted.name)
    with running_studio(workdir) as s:
        yield s


@pytest.fixture(scope="module")
def client(studio):
    return openai.OpenAI(base_url=studio.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _queue(studio) -> dict:
    return httpx.get(studio.url + "/v1/queue", headers={"Authorization": f"Bearer {KEY}"}).json()


def test_model_list_and_keys(studio, client):
    ids = {m.id for m in client.models.list()}
    assert {CHAT, "all-minilm-l6-v2", "whisper-tiny.en", "tiny-sd-demo"} <= ids
    wrong = openai.OpenAI(base_url=studio.url + "/v1", api_key="sk-wrong-key-0000000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.models.list()
    assert e.value.status_code == 401
    assert httpx.get(studio.url + "/v1/models").status_code == 401  # no key at all
    assert "sk-wrong-key" not in studio.log() and KEY not in studio.log()  # keys are never logged


def test_chat_plain_stop_and_length(client):
    r = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=20, temperature=0,
                                       extra_body={"frequency_penalty": 0, "unknown_field": {"x": 1}})  # fmt: skip
    text = r.choices[0].message.content
    assert "Paris" in text and r.choices[0].finish_reason == "stop"
    u = r.usage
    assert (
        u.prompt_tokens > 5
        and 0 < u.completion_tokens <= 20
        and u.total_tokens == u.prompt_tokens + u.completion_tokens
    )
    cut = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=20, temperature=0, stop=["Paris"])
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=CHAT, messages=QUESTION, max_completion_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_chat_streaming_with_usage_matches_plain(client):
    plain = client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    no_usage = list(client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=2, stream=True))
    assert all(c.usage is None and c.choices for c in no_usage)


def test_seed_completions_json_and_refusals(client):
    def sampled():
        return client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=8, temperature=1.0,
                                              seed=7).choices[0].message.content  # fmt: skip

    assert sampled() == sampled()
    done = client.completions.create(model=CHAT, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in done.choices[0].text and done.object == "text_completion"
    js = client.chat.completions.create(model=CHAT, max_tokens=60, temperature=0, response_format={"type": "json_object"},
                                        messages=[{"role": "user", "content": "Give a JSON with name and age of a person"}])  # fmt: skip
    assert isinstance(json.loads(js.choices[0].message.content), dict)
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        client.chat.completions.create(model=CHAT, messages=QUESTION, tools=[{"type": "function", "function": {
            "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}])  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="GET /v1/models"):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=CHAT, messages=QUESTION, temperature=9)


def test_embeddings_float_and_base64(studio, client):
    texts = ["The cat sat on the mat.", "A kitten rests on a rug.", "Quarterly tax filing deadlines."]
    f = client.embeddings.create(model="all-minilm-l6-v2", input=texts, encoding_format="float")
    vec = np.array([d.embedding for d in f.data])
    assert vec.shape == (3, 384) and np.allclose(np.linalg.norm(vec, axis=1), 1, atol=1e-4)
    assert vec[0] @ vec[1] > vec[0] @ vec[2] + 0.2  # related sentences are nearer
    raw = httpx.post(studio.url + "/v1/embeddings", headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": "all-minilm-l6-v2", "input": texts, "encoding_format": "base64"}).json()  # fmt: skip
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert np.allclose(decoded, vec, atol=1e-6)
    b = client.embeddings.create(model="all-minilm-l6-v2", input=texts)  # the client asks for base64 by default
    assert np.allclose(np.array([d.embedding for d in b.data]), vec, atol=1e-6)


def test_transcription_srt_and_verbose(client):
    clip = REPO / "assets" / "audio" / "one-sentence.mp3"
    with clip.open("rb") as f:
        srt = client.audio.transcriptions.create(model="whisper-1", file=f, response_format="srt")
    assert srt.startswith("1\n00:00:00,") and " --> " in srt and "airport" in srt.lower()
    with clip.open("rb") as f:
        v = client.audio.transcriptions.create(model="whisper-tiny.en", file=f, response_format="verbose_json",
                                               timestamp_granularities=["word", "segment"])  # fmt: skip
    assert v.segments and v.segments[0].end > v.segments[0].start and "platform" in v.text.lower()
    assert v.words and v.words[0].end >= v.words[0].start


def test_image_from_demo_pipeline(client):
    from PIL import Image

    r = client.images.generate(model="tiny-sd-demo", prompt="a lighthouse at dusk", size="64x64", n=1,
                               extra_body={"steps": 2, "seed": 3})  # fmt: skip
    img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert img.size == (64, 64) and img.format == "PNG"


def test_queue_bound_then_disconnect_frees_the_model(studio, client):
    stream = client.chat.completions.create(model=CHAT, max_tokens=2000, temperature=1.0, stream=True,
                                            messages=[{"role": "user", "content": "Write a very long story."}])  # fmt: skip
    it = iter(stream)
    for _ in range(3):
        next(it)  # running: the first tokens came
    waiting: dict = {}
    t = threading.Thread(target=lambda: waiting.update(r=client.chat.completions.create(
        model=CHAT, messages=QUESTION, max_tokens=12, temperature=0)))  # fmt: skip
    t.start()
    deadline = time.monotonic() + 30
    while _queue(studio)["queues"]["chat"]["waiting"] < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model=CHAT, messages=QUESTION, max_tokens=4)
    assert e.value.status_code == 503 and int(e.value.response.headers["retry-after"]) >= 1
    stream.close()  # the client goes away mid-generation
    t.join(60)
    assert "Paris" in waiting["r"].choices[0].message.content  # the waiting request was served next
    recent = _queue(studio)
    long = next(r for r in recent["recent"] if r["route"] == "chat" and r["status"] == "cancelled")
    assert 3 <= long["tokens"] < 2000  # it stopped, far from max_tokens
    assert recent["queues"]["chat"] == {"running": 0, "waiting": 0} and not recent["leases"]
