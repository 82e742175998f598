"""Chat LLM backend: in-process transformers models through the residency manager, or an OpenAI-compatible server.

`chat()` streams `ChatUpdate`s and stops within one token of `cancel` being set; `complete()` is the blocking
helper other capabilities use (e.g. ASR post-editing). On CUDA the decode step runs as a CUDA graph over a static
KV cache (backends/llm/fastdecode.py); models above ~3B parameters load as int4 where the kernel runs (sm80+,
Llama architecture: the fused int4 decoder of backends/llm/compact.py) and as nf4 elsewhere; on CPU a plain
dynamic-cache loop runs in fp32. The weight format is shown in the reply's stats line (`stats.weights`). Prompts
longer than the context are trimmed from the oldest turns with a note (generate.py).

Split: this module is the engine (configuration, chat and completion streams, the generation slot, decoders);
types.py the configuration and updates, loader.py the residency Loader, chat_adapters.py the adapter API,
remote.py the OpenAI-compatible client and the policy on which hosts it may reach.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.llm import streamed
from backends.llm.adapters import AdapterError, AdapterState
from backends.llm.chat_adapters import ChatAdapters
from backends.llm.generate import (
    GenerationOptions,
    GenerationStats,
    build_prompt,
    options_for_size,
    params_from_name,
    stream_tokens,
)
from backends.llm.loader import ChatModelLoader, eos_ids, kv_cache_bytes
from backends.llm.models import (
    ModelNotAvailable,
    ModelSource,
    converted_dir,
    ensure_converted,
    load_tokenizer,
    resolve_source,
)
from backends.llm.remote import EngineError, OpenAIChatClient, OpenAIEngineConfig, check_remote_host
from backends.llm.tools import (
    ToolCall,
    ToolError,
    ToolsNotSupported,
    ToolStream,
    call_prefix,
    check_tool_choice,
    check_tools,
    parse_tool_calls,
    supports_tools,
    template_messages,
    tool_format,
)
from backends.llm.types import ChatUpdate, GenerationBusy, LLMConfig, check_messages
from studio.concurrency import OwnedSlot, SafeStream
from studio.safety import WeightsError

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

__all__ = [  # what callers imported from this module before types, loader and chat_adapters were split off
    "AdapterError", "ChatModelLoader", "ChatUpdate", "EngineError", "GenerationOptions", "GenerationStats",
    "LLMBackend", "LLMConfig", "ModelNotAvailable", "ToolCall", "ToolError", "ToolsNotSupported", "WeightsError",
    "check_messages", "create", "eos_ids", "kv_cache_bytes", "options_for_size", "parse_tool_calls",
]  # fmt: skip


class LLMBackend(ChatAdapters):
    """One chat engine for the studio: configuration, model resolution, the generation slot and the decoders; the
    adapter API comes from ChatAdapters (chat_adapters.py), the residency Loader from loader.py."""

    def __init__(self, ctx: Services, config: LLMConfig | None = None) -> None:
        self.ctx = ctx
        self._config = config or LLMConfig()
        self._lock = OwnedSlot()  # one in-process generation at a time (static buffers are shared); any thread frees it
        self._tokenizers: dict[str, Any] = {}
        self._sources: dict[str, ModelSource] = {}
        self._adapters: dict[str, AdapterState] = {}
        self._applied: dict[str, tuple[int, int]] = {}  # key -> (id(model), adapter version) last applied
        self._decoder: Any = None
        self._decoder_key: tuple[str, int] | None = None
        self.last_decoder: str = ""

    # ---- configuration --------------------------------------------------------------------------------------
    @property
    def config(self) -> LLMConfig:
        return self._config

    def configure(self, **changes: Any) -> LLMConfig:
        """Change the default configuration (scripts, RAG); the Chat tab passes its own per-session `config`."""
        self._config = replace(self._config, **changes)
        return self._config

    def session_config(self, **changes: Any) -> LLMConfig:
        """The default configuration with one session's changes, validated; the backend's own stays as it was."""
        return replace(self._config, **changes)

    def check_remote(self, config: LLMConfig) -> None:
        """The owner decides where chat requests may go: `remote_engine_hosts`, and with offline only loopback."""
        check_remote_host(self.ctx.settings, config.base_url)

    def recommended_options(self, model_id: str | None = None, **overrides: Any) -> GenerationOptions:
        """Sampling defaults for the model's size (small models: low temperature, repetition penalty, short max)."""
        model_id = model_id or self._config.model_id
        try:
            name = f"{model_id} {self.ctx.catalog.get(model_id).title}"
        except KeyError:
            name = model_id
        return options_for_size(params_from_name(name), **overrides)

    def load_note(self, config: LLMConfig | None = None) -> str:
        """'' when `config`'s model (default: the backend's) is loaded; else what the first reply waits for
        ('first time: converting, ~30 s')."""
        c = config or self._config
        if c.engine == "openai":
            return ""
        try:
            src = self._source(c.model_id, c.precision)
        except (ValueError, OSError):
            return ""  # chat() raises the clear message
        loaded = {m.key for m in self.ctx.residency.snapshot().models if m.tier != "disk"}
        if src.key in loaded:
            return ""
        if src.is_gguf and not converted_dir(self.ctx.settings.cache_dir, src.key).joinpath("config.json").is_file():
            return f"Loading {src.title} (first time: converting the GGUF file to safetensors, ~30 s, longer on a busy CPU)…"
        return f"Loading {src.title}…"

    def chat_models(self) -> list[tuple[Any, bool]]:
        """(ModelSpec, present on this machine) for every chat model of the catalog."""
        cat = self.ctx.catalog
        return [(s, cat.is_present(s)) for s in cat.by_capability("chat")]

    # ---- models ---------------------------------------------------------------------------------------------
    def _source(self, model_id: str, precision: str | None = None) -> ModelSource:
        """Resolve and register the model; a forced precision gets its own residency key ("chat:<id>@nf4")."""
        precision = precision or self._config.precision
        cache_key = f"{model_id}@{precision}"
        src = self._sources.get(cache_key)
        if src is None:
            src = resolve_source(self.ctx, model_id)
            if precision != "auto":
                src = replace(src, key=f"{src.key}@{precision}")
            self._sources[cache_key] = src
        if not self.ctx.residency.is_registered(src.key):
            self.ctx.residency.register(ChatModelLoader(src, self, precision))
        return src

    def model_folder(self, src: ModelSource) -> Path:
        """The transformers folder of a source (a GGUF is converted once into the cache)."""
        if src.is_gguf:
            return ensure_converted(src.path, converted_dir(self.ctx.settings.cache_dir, src.key))
        return src.path

    def _tokenizer(self, src: ModelSource) -> Any:
        if src.key not in self._tokenizers:
            self._tokenizers[src.key] = load_tokenizer(self.model_folder(src))
        return self._tokenizers[src.key]

    def _forget_model(self, key: str) -> None:
        """Called when the residency manager releases a model: drop what points at its memory."""
        self._applied.pop(key, None)
        self._drop_decoder(key)

    def _drop_decoder(self, key: str) -> None:
        """The fast decoder's buffers, if they are this model's (an idle model: no generation is using them)."""
        if self._decoder_key and self._decoder_key[0] == key:
            self._decoder, self._decoder_key = None, None

    def release_decode_buffers(self) -> None:
        """Free the static KV cache and CUDA graph of the fast decoder (rebuilt on the next message)."""
        with self._lock:
            self._decoder, self._decoder_key = None, None

    # ---- chat -----------------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict[str, Any]],
        options: GenerationOptions | None = None,
        *,
        cancel: threading.Event | None = None,
        config: LLMConfig | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = "auto",
        model: str | None = None,
        reply_prefix: str = "",
        continuing: bool = False,
    ) -> Iterator[ChatUpdate]:
        """Stream the assistant's reply to `messages` (the last one from the user or a tool), with `config` (one
        session's engine, URL, key and model) or the backend's default; no call changes what another call uses.

        `tools` (OpenAI JSON-schema dicts) go to the model's chat template; the last update then carries the parsed
        `tool_calls` (finish_reason "tool_calls"). `model` picks another chat model than the configured one for
        this reply; `reply_prefix` is prefilled as the start of the reply (and is part of its text). `continuing`:
        the last message is an assistant reply; generation goes on from its end (Continue: it becomes the
        reply_prefix), and every update's text includes it. The stream may be stepped on any thread and closed
        from another one (Gradio's Stop): closing stops the running step within a token."""
        return SafeStream(
            lambda stop: self._chat(
                messages, options, stop, config, tools, tool_choice, model, reply_prefix, continuing
            ),
            cancel,
        )

    def _chat(self, messages, options, cancel, config, tools, tool_choice, model, reply_prefix, continuing=False):
        t0 = time.perf_counter()
        opts = options or GenerationOptions()
        c = config or self._config
        if continuing:  # Continue: the unfinished reply is the prefix the model goes on from
            check_messages(messages, continuing=True)
            messages, reply_prefix = messages[:-1], messages[-1]["content"] + reply_prefix
        else:
            check_messages(messages)
        tools = check_tools(tools) if tools else None
        choice = check_tool_choice(tool_choice, tools) if tools else "none"
        if opts.system_prompt.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": opts.system_prompt}, *messages]
        if c.engine == "openai":
            if continuing:
                raise ValueError("Continue works with the in-process engine only; send a message instead.")
            if tools:
                raise ToolsNotSupported("Tool calling goes to in-process models; the remote engine does not relay it.")
            self.check_remote(c)
            yield from self._chat_remote(c, messages, opts, cancel)
            return
        src = self._source(model or c.model_id, c.precision)
        tok = self._tokenizer(src)
        stream = None
        if tools and choice != "none":
            if not supports_tools(tok):
                raise ToolsNotSupported(
                    f"{src.key}'s chat template has no tool support, so it cannot call tools: pick a tool-capable "
                    "model (Qwen2.5, Llama 3.1+, Mistral, Hermes) or send the request without tools."
                )
            if choice != "auto":
                reply_prefix = call_prefix(tool_format(tok), None if choice == "required" else choice)
            stream = ToolStream(reply_prefix)
        msgs = template_messages(messages)

        def prompt(budget: int) -> tuple[list[int], str]:
            return build_prompt(tok, msgs, budget, tools=tools if stream else None, prefix=reply_prefix)

        yield from self._generate_local(c, src, tok, prompt, opts, cancel, reply_prefix, stream, t0)

    def complete_text(
        self,
        prompt: str,
        options: GenerationOptions | None = None,
        *,
        cancel: threading.Event | None = None,
        model: str | None = None,
    ) -> Iterator[ChatUpdate]:
        """Continue raw `prompt` text (no chat template): the OpenAI completions route."""
        opts = options or GenerationOptions()
        if not isinstance(prompt, str) or not prompt or "\x00" in prompt:
            raise ValueError("The prompt is empty or contains a null byte (\\x00): give the text to continue.")
        if self._config.engine == "openai":
            raise EngineError("Text completion runs on in-process models only; the remote engine serves chat.")
        c = self._config
        src = self._source(model or c.model_id, c.precision)
        tok = self._tokenizer(src)

        def ids(budget: int) -> tuple[list[int], str]:
            tokens = tok(prompt, add_special_tokens=True)["input_ids"]
            if len(tokens) > budget:
                return tokens[-budget:], f"The prompt was too long: kept only its last {budget} tokens."
            return tokens, ""

        yield from self._generate_local(c, src, tok, ids, opts, cancel, "", None)

    def complete(self, messages: list[dict[str, str]], *, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        opts = GenerationOptions(temperature=temperature, max_new_tokens=max_new_tokens)
        text = ""
        for update in self.chat(messages, opts):
            text = update.text
        return text

    def _chat_remote(self, c: LLMConfig, messages: list, opts: GenerationOptions, cancel: threading.Event | None):
        client = OpenAIChatClient(OpenAIEngineConfig(c.base_url, c.api_model, c.api_key))
        stats, text, chunks, counted = GenerationStats(decoder=f"openai:{c.api_model}"), "", 0, False
        for piece in client.stream(messages, opts, cancel):
            if piece.delta:
                text += piece.delta
                chunks += 1
                yield ChatUpdate(text, piece.delta)
            if piece.finish_reason:
                stats.finish_reason = piece.finish_reason
            if piece.completion_tokens is not None:
                stats.new_tokens, counted = piece.completion_tokens, True
        if not counted:
            stats.new_tokens = chunks
            stats.notes.append("the server reported no token usage: counts are stream chunks")
        self.last_decoder = stats.decoder
        yield ChatUpdate(text, done=True, stats=stats)

    def _generate_local(self, c: LLMConfig, src, tok, prompt, opts, cancel, prefix: str, tools: ToolStream | None,
                        t0: float | None = None):  # fmt: skip
        """Lease the model, build the prompt within its context, stream tokens; tool text goes through `tools`.
        `t0`: when the request started (the stats' load_s counts conversion and loading from there)."""
        from backends.llm.int4 import weight_format

        t0 = time.perf_counter() if t0 is None else t0
        working = kv_cache_bytes(self.model_folder(src), c.max_context_tokens)
        self._declare_job(src, c)
        with self._generation_slot(), self.ctx.residency.use(src.key, working_bytes=working) as model:
            self._apply_adapters(src.key, model)
            limit = min(c.max_context_tokens, getattr(model.config, "max_position_embeddings", 1 << 30))
            ids, note = prompt(limit - opts.max_new_tokens)
            if note:
                yield ChatUpdate(prefix if tools is None else "", note=note)
            decoder = self._get_decoder(src.key, model, len(ids) + opts.max_new_tokens, limit, c.fast_decode)
            stats = GenerationStats(notes=[note] if note else [], load_s=time.perf_counter() - t0)
            stats.notes += streamed.streaming_note(model)
            text = prefix
            if prefix and tools is None:
                yield ChatUpdate(text, prefix)
            try:
                for piece in stream_tokens(decoder, tok, ids, opts, eos_ids=eos_ids(tok, model), cancel=cancel,
                                           stats=stats):  # fmt: skip
                    text = prefix + piece.text
                    shown = tools.feed(piece.delta) if tools is not None else piece.delta
                    if shown:
                        yield ChatUpdate(text, shown, stats=stats)  # live counts: the tab's context meter
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    advice = self._oom_advice(src.key)
                    raise RuntimeError(
                        f"Out of GPU memory while generating ({len(ids)} prompt tokens): lower max new tokens or "
                        "the context length, or free the GPU in the GPU tab." + (f" {advice}" if advice else "")
                    ) from None
                raise
            stats.weights = weight_format(model)
            self.last_decoder = stats.decoder
            calls: list[ToolCall] = []
            if tools is not None:
                rest, calls = tools.finish()
                if rest:
                    yield ChatUpdate(text, rest)
                if calls:
                    stats.finish_reason = "tool_calls"
            yield ChatUpdate(text, done=True, note=note, stats=stats, tool_calls=tuple(calls))

    def _declare_job(self, src: ModelSource, c: LLMConfig) -> None:
        """Tell the VRAM planner what this lease runs (chat at the context length): it learns from the lease's
        measured peak and words the advice of an out-of-memory error."""
        from studio.planner import Chat, ModelInfoError, read_model

        vram = getattr(self.ctx.residency, "vram", None)
        if vram is None:
            return
        try:
            info = read_model(self.model_folder(src))
            cuda = str(self.ctx.residency.device).startswith("cuda")
            big = info.params > 3_000_000_000
            precision = {"auto": "nf4" if big else "16bit", "int4": "int4", "nf4": "nf4"}.get(c.precision, "16bit")
            vram.declare(src.key, info, Chat(context=c.max_context_tokens, precision=precision if cuda else "fp32"))
        except (ModelInfoError, OSError, ValueError, KeyError) as e:
            log.debug("no VRAM planner job for %s: %s", src.key, e)

    def _oom_advice(self, key: str) -> str:
        vram = getattr(self.ctx.residency, "vram", None)
        return "" if vram is None else vram.advice(key, self.ctx.residency.capacity_bytes())

    @contextlib.contextmanager
    def _generation_slot(self, timeout_s: float = 300.0) -> Iterator[None]:
        """One in-process generation at a time; a stuck one yields a clear error instead of a silent hang."""
        token = self._lock.acquire(timeout=timeout_s)
        if token is None:
            raise GenerationBusy(f"Another reply has been generating for over {timeout_s:.0f} s; press Stop and retry.")
        try:
            yield
        finally:
            self._lock.release(token)

    def _get_decoder(self, key: str, model: Any, needed: int, limit: int, fast: bool = True) -> Any:
        from backends.llm.compact import FusedInt4Decoder, fused_layers
        from backends.llm.fastdecode import EagerDecoder, bucket_len, model_device, static_decoder

        int4 = fused_layers(model) is not None  # the fused decoder runs on any device the int4 kernel runs on
        if not fast or (model_device(model).type != "cuda" and not int4) or streamed.streamer_of(model) is not None:
            return EagerDecoder(model)  # (a streamed model's layers come and go per step: no static cache or graph)
        version = self._adapters.get(key, AdapterState()).version
        d = self._decoder
        if d is not None and self._decoder_key == (key, version) and d.matches(model, needed):
            return d
        previous, self._decoder = (d if self._decoder_key == (key, version) else None), None
        n = bucket_len(needed, limit)
        self._decoder = FusedInt4Decoder(model, n) if int4 else static_decoder(model, n, previous)
        previous = None  # its cache is freed here (its prefix, if any, was copied)
        self._decoder_key = (key, version)
        return self._decoder


def create(ctx: Services) -> LLMBackend:
    return LLMBackend(ctx)
