"""The LLM backend on CPU with the real offline SmolLM2-135M-Instruct (converted once per session)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from backends.llm.backend import GenerationOptions, LLMBackend, LLMConfig, ModelNotAvailable
from studio.safety import UnsafePathError, WeightsError
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = GenerationOptions(temperature=0.0, max_new_tokens=40)


def test_real_model_answers_the_capital_of_france(llm):
    answer = llm.complete(FRANCE, max_new_tokens=32)
    assert "Paris" in answer


def test_conversion_is_cached_and_reloads_fast(smol_folder):
    from backends.llm.models import check_model_folder, load_causal_lm

    assert (smol_folder / ".converted").is_file() and (smol_folder / "model.safetensors").is_file()
    t0 = time.perf_counter()
    model = load_causal_lm(smol_folder, "cpu", params=check_model_folder(smol_folder))
    assert time.perf_counter() - t0 < 3.0  # ~0.1 s on an idle machine; the GGUF route takes ~15 s
    assert model.config.num_hidden_layers == 30


def test_streaming_yields_several_chunks(llm):
    opts = GenerationOptions(temperature=0.0, max_new_tokens=12)
    updates = list(llm.chat([{"role": "user", "content": "Name three colours."}], opts))
    deltas = [u.delta for u in updates if u.delta]
    assert len(deltas) >= 3
    assert "".join(deltas) == updates[-1].text
    final = updates[-1]
    assert final.done and final.stats.new_tokens >= len(deltas) and final.stats.decoder == "eager"
    assert final.stats.finish_reason in ("eos", "length")


def test_cancel_stops_within_one_token(llm):
    cancel = threading.Event()
    opts = GenerationOptions(temperature=0.0, max_new_tokens=200)
    tokens_when_cancelled = None
    for update in llm.chat([{"role": "user", "content": "Write a long story about a dragon."}], opts, cancel=cancel):
        if update.delta and tokens_when_cancelled is None:
            cancel.set()
            tokens_when_cancelled = len(update.text.split())
        final = update
    assert final.done and final.stats.finish_reason == "cancelled"
    assert final.stats.new_tokens <= 3  # the chunk that triggered the cancel came from token 1 or 2

    cancel_first = threading.Event()
    cancel_first.set()
    *_, final = llm.chat(FRANCE, opts, cancel=cancel_first)
    assert final.stats.new_tokens == 1 and final.stats.finish_reason == "cancelled"


def test_stop_string_ends_the_reply(llm):
    opts = GenerationOptions(temperature=0.0, max_new_tokens=12, stop=("Paris",))
    *_, final = llm.chat(FRANCE, opts)
    assert "Paris" not in final.text and final.stats.finish_reason == "stop_string"


def test_overlong_history_is_trimmed_with_a_note(llm_ctx, llm):
    small = LLMBackend(llm_ctx, LLMConfig(max_context_tokens=256))
    history = []
    for i in range(12):
        history += [
            {"role": "user", "content": f"Question {i}: tell me about the number {i} in some detail, please."},
            {"role": "assistant", "content": f"The number {i} is a number. " * 4},
        ]
    history.append(FRANCE[0])
    updates = list(small.chat(history, GenerationOptions(temperature=0.0, max_new_tokens=12)))
    assert "oldest message" in updates[0].note
    assert updates[-1].done and "Paris" in updates[-1].text
    assert updates[-1].stats.prompt_tokens <= 256 - 12


def test_overlong_single_message_keeps_its_end(llm):
    from backends.llm.generate import PromptTooLong, build_prompt

    tok = llm._tokenizer(llm._source("smollm2-135m"))
    long_message = "blah " * 2000 + "\nNow answer: what is the capital of France?"
    ids, note = build_prompt(tok, [{"role": "user", "content": long_message}], budget=250)
    assert "kept only its last" in note
    assert 200 < len(ids) <= 250  # as much of the message as fits
    assert tok.decode(ids).rstrip().endswith("assistant")  # the template still ends with the reply header
    assert "what is the capital of France?" in tok.decode(ids)  # the end of the message survives
    system = {"role": "system", "content": "Be brief. " * 300}
    with pytest.raises(PromptTooLong, match="system prompt alone"):
        build_prompt(tok, [system, {"role": "user", "content": "hi"}], budget=250)


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "No messages"),
        ([{"role": "user", "content": "   "}], "empty"),
        ([{"role": "user", "content": "hi\x00there"}], "null byte"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "last message"),
        ([{"role": "wizard", "content": "hi"}], "malformed"),
    ],
)
def test_bad_messages_are_refused_clearly(llm, messages, match):
    with pytest.raises(ValueError, match=match):
        list(llm.chat(messages))


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerationOptions(temperature=-1)
    with pytest.raises(ValueError, match="stop="):
        GenerationOptions(stop=("",))
    with pytest.raises(ValueError, match="engine="):
        LLMConfig(engine="llamafile")
    with pytest.raises(ValueError, match="base_url"):
        LLMConfig(engine="openai", base_url="localhost:11434", api_model="x")


def test_missing_models_say_how_to_get_them(llm_ctx):
    with pytest.raises(ModelNotAvailable, match="neither a catalog id nor a folder"):
        LLMBackend(llm_ctx, LLMConfig(model_id="no-such-model")).complete(FRANCE)
    with pytest.raises(ModelNotAvailable, match="Models tab"):
        LLMBackend(llm_ctx, LLMConfig(model_id="llama-3.1-8b-instruct")).complete(FRANCE)
    with pytest.raises(UnsafePathError):
        LLMBackend(llm_ctx, LLMConfig(model_id="../../etc")).complete(FRANCE)


def _broken_copy(llm_ctx, smol_folder, name: str):
    folder = llm_ctx.settings.models_dir / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for f in smol_folder.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    return folder


def test_truncated_safetensors_and_lfs_pointer_are_refused(llm_ctx, smol_folder):
    folder = _broken_copy(llm_ctx, smol_folder, "truncated")
    with (smol_folder / "model.safetensors").open("rb") as f:
        (folder / "model.safetensors").write_bytes(f.read(1_000_000))
    with pytest.raises(WeightsError, match="truncated"):
        LLMBackend(llm_ctx, LLMConfig(model_id="truncated")).complete(FRANCE)

    folder = _broken_copy(llm_ctx, smol_folder, "lfs-pointer")
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 538090408\n"
    )
    with pytest.raises(WeightsError, match="git-LFS pointer"):
        LLMBackend(llm_ctx, LLMConfig(model_id="lfs-pointer")).complete(FRANCE)


def test_static_cache_decoder_matches_generate_greedy(llm_ctx, llm):
    """The GPU fast path without the graph: static cache + in-place position buffers, token for token on CPU."""
    import torch

    from backends.llm.fastdecode import EagerDecoder, StaticDecoder
    from backends.llm.generate import render_ids, stream_tokens

    tok = llm._tokenizer(llm._source("smollm2-135m"))
    ids = render_ids(tok, [{"role": "user", "content": "Write a haiku about rain."}])
    n = 16
    with llm_ctx.residency.use("chat:smollm2-135m") as model:
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, len(ids) :]
        for decoder in (EagerDecoder(model), StaticDecoder(model, len(ids) + n + 8, use_graph=False)):
            got = _token_ids(decoder, tok, ids, n, stream_tokens)
            assert got == ref.tolist(), decoder.name


def test_static_decoder_reuses_the_conversation_prefix(llm_ctx, llm):
    """A second turn prefills only what is new, with the logits of a full prefill; a changed history reuses only
    the common part; `adopt` carries the prefix into a larger cache when the conversation outgrows its slots."""
    import torch

    from backends.llm.fastdecode import StaticDecoder, static_decoder
    from backends.llm.generate import render_ids, stream_tokens

    tok = llm._tokenizer(llm._source("smollm2-135m"))
    turn1 = render_ids(tok, [{"role": "user", "content": "Name three colours."}])
    with llm_ctx.residency.use("chat:smollm2-135m") as model:
        small = StaticDecoder(model, 96, use_graph=False)
        reply = _token_ids(small, tok, turn1, 8, stream_tokens)
        turn2 = turn1 + reply + tok(" And three animals?", add_special_tokens=False)["input_ids"]
        grown = static_decoder(model, 128, small)  # same weights: the cached prompt and reply come along
        assert grown.pos == len(turn1) + len(reply) - 1  # the last reply token was never fed back
        got = grown.prefill(torch.tensor([turn2]))
        assert grown.reused == len(turn1) + len(reply) - 1
        full = StaticDecoder(model, 128, use_graph=False).prefill(torch.tensor([turn2]))
        assert torch.allclose(got, full, atol=1e-4, rtol=1e-4)
        assert got.argmax() == full.argmax()
        edited = [*turn1[:5], turn1[5] + 1, *turn1[6:]]  # the user edited an early message
        again = grown.prefill(torch.tensor([edited]))
        assert grown.reused == 5
        assert torch.allclose(again, StaticDecoder(model, 128, use_graph=False).prefill(torch.tensor([edited])),
                              atol=1e-4, rtol=1e-4)  # fmt: skip


def _token_ids(decoder, tok, ids, n, stream_tokens):
    class Recorder:
        def __init__(self):
            self.ids = []

        def decode(self, ids, skip_special_tokens=True):
            self.ids = list(ids)
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    rec = Recorder()
    for _ in stream_tokens(decoder, rec, ids, GenerationOptions(temperature=0.0, max_new_tokens=n), eos_ids=set()):
        pass
    return rec.ids


def test_chat_stepped_on_two_threads_and_closed_from_a_third_frees_the_slot(llm):
    """Gradio steps a generator on any worker thread and closes it on the event loop (Stop): the generation slot
    must be freed by whichever thread ends it, or every later reply waits 300 s and fails."""
    from concurrent.futures import ThreadPoolExecutor

    opts = GenerationOptions(temperature=0.0, max_new_tokens=60)
    a, b, c = (ThreadPoolExecutor(1) for _ in range(3))
    try:
        stream = llm.chat([{"role": "user", "content": "Count from one to fifty."}], opts)
        first = a.submit(next, stream).result(60)
        second = b.submit(next, stream).result(60)
        assert first.text or first.note is not None or second.text
        c.submit(stream.close).result(60)  # the event loop's thread, not a stepping one
        assert not llm._lock.busy
        t0 = time.monotonic()
        assert llm.complete([{"role": "user", "content": "Hi"}], max_new_tokens=2) is not None
        assert time.monotonic() - t0 < 30

        # close() while another thread is in the middle of stepping: the step ends within a token, no error
        stream = llm.chat([{"role": "user", "content": "Write a long story about a dragon."}], opts)
        next(stream)
        stepping = a.submit(lambda: [u for u in stream])
        time.sleep(0.05)
        c.submit(stream.close).result(60)
        updates = stepping.result(60)
        assert len(updates) < 60 and not llm._lock.busy
    finally:
        for pool in (a, b, c):
            pool.shutdown()


def test_swapping_the_chat_model_to_ram_drops_only_its_decoder_buffers(llm_ctx):
    """ChatModelLoader.on_evict: the static KV cache and CUDA graph of that model's decoder go (GPU memory the
    residency manager does not count between messages); another model's decoder and applied adapters stay."""
    from backends.llm.backend import ChatModelLoader

    backend = LLMBackend(llm_ctx, LLMConfig(model_id="smollm2-135m"))
    src = backend._source("smollm2-135m")
    loader, applied = ChatModelLoader(src, backend), object()
    backend._applied[src.key] = applied
    backend._decoder, backend._decoder_key = object(), ("chat:another", 0)
    loader.on_evict(None)
    assert backend._decoder is not None  # not this model's
    backend._decoder_key = (src.key, 0)
    loader.on_evict(None)
    assert (backend._decoder, backend._decoder_key) == (None, None) and backend._applied[src.key] is applied


def test_a_held_generation_slot_runs_out_as_an_expected_wait_not_a_failure(llm):
    """The chat tab logs a TimeoutError (an OSError) in one line with the message; the API answers 503 busy."""
    from backends.llm.types import GenerationBusy
    from studio.api.jobs import as_api_error

    busy = pytest.raises(TimeoutError, match="Another reply has been generating")
    with llm._generation_slot(), busy as e, llm._generation_slot(timeout_s=0.1):
        pass
    assert isinstance(e.value, GenerationBusy) and isinstance(e.value, OSError)
    err = as_api_error(e.value)
    assert err.status == 503 and err.headers.get("Retry-After")
    with llm._generation_slot(timeout_s=1):
        pass  # the slot was given back
