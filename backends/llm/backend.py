"""Chat LLM backend: in-process transformers models through the residency manager, or an OpenAI-compatible server.

`chat()` streams `ChatUpdate`s and stops within one token of `cancel` being set; `complete()` is the blocking
helper other capabilities use (e.g. ASR post-editing). On CUDA the decode step runs as a CUDA graph over a static
KV cache (backends/llm/fastdecode.py); models above ~3B parameters load as int4 where the kernel runs (sm80+,
Llama architecture: the fused int4 decoder of backends/llm/compact.py) and as nf4 elsewhere; on CPU a plain
dynamic-cache loop runs in fp32. The weight format is shown in the reply's stats line (`stats.weights`). Prompts
longer than the context are trimmed from the oldest turns with a note (generate.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backends.llm import streamed
from backends.llm.adapters import AdapterError, AdapterState, check_adapter_folder, delete_from, find_adapters
from backends.llm.generate import (
    GenerationOptions,
    GenerationStats,
    build_prompt,
    options_for_size,
    params_from_name,
    stream_tokens,
)
from backends.llm.models import (
    ModelNotAvailable,
    ModelSource,
    check_model_folder,
    choose_precision,
    converted_dir,
    ensure_converted,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from backends.llm.remote import EngineError, OpenAIChatClient, OpenAIEngineConfig
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
from studio.concurrency import OwnedSlot, SafeStream
from studio.safety import WeightsError, contained_path, safe_filename

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

ENGINES = ("transformers", "openai")
ROLES = ("system", "user", "assistant", "tool")
PRECISIONS = ("auto", "int4", "nf4", "16bit")
__all__ = [
    "AdapterError", "ChatUpdate", "EngineError", "GenerationOptions", "GenerationStats", "LLMBackend", "LLMConfig",
    "ModelNotAvailable", "ToolCall", "ToolError", "ToolsNotSupported", "WeightsError", "check_messages", "create",
    "options_for_size", "parse_tool_calls",
]  # fmt: skip


@dataclass(frozen=True)
class LLMConfig:
    engine: str = "transformers"  # or "openai": any OpenAI-compatible server
    model_id: str = "smollm2-135m"  # catalog id or a folder name under models_dir
    base_url: str = ""  # engine "openai": e.g. http://127.0.0.1:11434/v1
    api_model: str = ""  # engine "openai": the server's model name
    api_key: str = field(default="", repr=False)
    max_context_tokens: int = 4096  # also bounds the KV cache, so a long chat can never run out of memory
    fast_decode: bool = True  # CUDA-graph decoding on GPU (falls back by itself when capture fails)
    precision: str = "auto"  # "auto": int4 (sm80+, Llama) or nf4 above ~3B params on CUDA; or force one of PRECISIONS

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine={self.engine!r}: choose one of {ENGINES}.")
        if self.engine == "openai":
            OpenAIEngineConfig(self.base_url, self.api_model, self.api_key)  # validates, with a clear message
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: choose one of {PRECISIONS}.")
        if not 256 <= self.max_context_tokens <= 131072:
            raise ValueError(f"max_context_tokens={self.max_context_tokens}: use 256 to 131072.")


@dataclass
class ChatUpdate:
    text: str  # the whole reply so far
    delta: str = ""
    note: str = ""  # e.g. what was trimmed; shown by the UI
    done: bool = False
    stats: GenerationStats | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # on the last update, when the model called tools


def check_messages(messages: list[dict[str, Any]], *, continuing: bool = False) -> None:
    """Refuse malformed conversations with a message that names the bad value.

    Besides system/user/assistant text turns, an assistant turn may carry `tool_calls` (content then may be None)
    and a `tool` turn gives a call's result; the conversation ends with the user or a tool result, or with
    `continuing`, with the assistant's unfinished reply, to be continued."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("No messages: type a message first.")
    for i, m in enumerate(messages):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (calls and m["content"] is None))
        if not isinstance(m, dict) or m.get("role") not in ROLES or not content_ok:
            raise ValueError(f"Message {i} is malformed ({m!r}): expected {{'role': one of {ROLES}, 'content': str}}.")
        if "\x00" in (m["content"] or ""):
            raise ValueError(f"Message {i} contains a null byte (\\x00); remove it and send again.")
    if continuing:
        if messages[-1]["role"] != "assistant" or not isinstance(messages[-1]["content"], str) or len(messages) < 2:
            raise ValueError("Nothing to continue: the last message is not a reply from the assistant.")
        return
    if messages[-1]["role"] not in ("user", "tool"):
        raise ValueError("The last message must be from the user (or a tool result).")
    if messages[-1]["role"] == "user" and not messages[-1]["content"].strip():
        raise ValueError("The message is empty: type something to send.")


class LLMBackend:
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
        from urllib.parse import urlparse

        from studio.settings import is_loopback_host

        s = self.ctx.settings
        host = (urlparse(config.base_url).hostname or "").lower()
        offline = s.offline or os.environ.get("HF_HUB_OFFLINE") == "1"
        if offline and not is_loopback_host(host):
            raise EngineError(f"{host!r} is not this machine and the studio runs offline: no request leaves it.")
        if (
            "*" not in s.remote_engine_hosts
            and host not in s.remote_engine_hosts
            and not (is_loopback_host(host) and any(is_loopback_host(h) for h in s.remote_engine_hosts))
        ):
            raise EngineError(
                f"The engine host {host!r} is not allowed; the studio's owner can add it to remote_engine_hosts "
                f"(allowed now: {', '.join(s.remote_engine_hosts) or 'none'})."
            )

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
            raise RuntimeError(f"Another reply has been generating for over {timeout_s:.0f} s; press Stop and retry.")
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

    # ---- adapters -------------------------------------------------------------------------------------------
    def _apply_adapters(self, key: str, model: Any) -> None:
        state = self._adapters.get(key)
        if state is None or self._applied.get(key) == (id(model), state.version):
            return
        state.apply(model)
        self._applied[key] = (id(model), state.version)

    def adapter_roots(self) -> list[Path]:
        s = self.ctx.settings
        return [Path(s.data_dir), Path(s.models_dir)]

    def available_adapters(self) -> list[Path]:
        return find_adapters(self.adapter_roots())

    def _adapter_path(self, folder: str | Path) -> Path:
        folder = Path(folder)
        for root in self.adapter_roots():
            try:
                rel = folder.resolve().relative_to(root.resolve()) if folder.is_absolute() else folder
                return contained_path(root, str(rel))
            except ValueError:
                continue
        raise AdapterError(f"Adapter {str(folder)!r} must be inside {self.adapter_roots()[0]} or the models folder.")

    def attach_adapter(self, folder: str | Path, name: str | None = None, *, model_id: str | None = None) -> str:
        """Load a PEFT adapter onto a base model (default: the configured one) and make it active; returns its name."""
        path = self._adapter_path(folder)
        check_adapter_folder(path)
        name = safe_filename(name or path.name, default="adapter")
        src = self._source(model_id or self._config.model_id)
        with self._lock:
            state = self._adapters.setdefault(src.key, AdapterState())
            with self.ctx.residency.use(src.key) as model:
                from backends.llm.int4 import weight_format

                if weight_format(model) == "int4":
                    raise AdapterError("LoRA adapters need the nf4 or 16-bit weights: set the chat precision to nf4.")
                self._apply_adapters(src.key, model)
                delete_from(model, name)  # re-attaching a name replaces it
                previous = state.active
                state.paths[name], state.active, state.version = path, name, state.version + 1
                try:
                    state.apply(model)
                except AdapterError:
                    state.paths.pop(name)
                    state.active = previous if previous in state.paths else None
                    state.apply(model)
                    raise
                self._applied[src.key] = (id(model), state.version)
        return name

    def switch_adapter(self, name: str | None, *, model_id: str | None = None) -> None:
        """Activate another attached adapter, or the base model with `None` (detach)."""
        key = self._source(model_id or self._config.model_id).key
        with self._lock:
            state = self._adapters.setdefault(key, AdapterState())
            if name is not None and name not in state.paths:
                raise AdapterError(f"No adapter named {name!r} is attached; attached: {sorted(state.paths)}.")
            state.active, state.version = name, state.version + 1

    def detach_adapter(self) -> None:
        self.switch_adapter(None)

    def adapter_status(self, model_id: str | None = None) -> tuple[list[str], str | None]:
        key = self._source(model_id or self._config.model_id).key
        state = self._adapters.get(key, AdapterState())
        return sorted(state.paths), state.active


def kv_cache_bytes(folder: Path, tokens: int) -> int | None:
    """Working memory of one chat turn: the 16-bit KV cache for `tokens` plus two float32 logits rows."""
    import json

    try:
        from studio.planner import kv_bytes

        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        return kv_bytes(c, tokens) + 8 * c["vocab_size"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for v in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, list | tuple):
            ids.update(int(x) for x in v)
    return ids


class ChatModelLoader:
    """Residency Loader for one chat model: checks the files, converts a GGUF once, loads with the precision policy."""

    def __init__(self, source: ModelSource, backend: LLMBackend, precision: str = "auto") -> None:
        self.key = source.key
        self.source = source
        self.precision = precision
        self._backend = backend

    def estimate_bytes(self) -> int:
        """Before the first load: the size it will have on the card. A 16-bit folder that loads in 4 bits is a
        third of its files (counting the files would send an 8B model that fits to the CPU, as 'never fits')."""
        if self.source.expected_vram_bytes:
            return self.source.expected_vram_bytes
        p = self.source.path
        on_disk = p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))
        if p.is_file():
            return on_disk
        try:
            from studio.planner import read_model
            from studio.planner.formulas import llm_weights

            info = read_model(p)
            precision = choose_precision(p, str(self._backend.ctx.residency.device), info.params, self.precision)
            if precision in ("int4", "nf4"):
                return min(on_disk, llm_weights(info.config, precision))
        except Exception as e:  # an unreadable config: the files' size, as before
            log.debug("no 4-bit estimate for %s: %s", p, e)
        return on_disk

    def load(self, device: str) -> Any:
        folder = self._backend.model_folder(self.source)
        params = check_model_folder(folder)
        return load_causal_lm(folder, device, params=params, precision=self.precision)

    def can_stream(self) -> bool:
        """Larger than the budget, it may run partly resident (layers streamed from RAM) instead of on the CPU: a
        safetensors folder (a GGUF file converts on its first load) loading in 4 bits or by the automatic policy."""
        return self.precision in ("auto", "nf4") and self.source.path.is_dir() and streamed.can_stream(self.source.path)

    def load_partial(self, device: str, room_bytes: int, accel: Any) -> tuple[Any, Any]:
        folder = self._backend.model_folder(self.source)
        check_model_folder(folder)
        return streamed.load_partial(folder, accel, room_bytes, self._backend.config.max_context_tokens)

    def on_evict(self, obj: Any) -> None:
        """Swapped to RAM: the fast decoder's static KV cache and CUDA graph (GPU memory the residency manager does
        not count between messages) go with it; the next message rebuilds them. Adapters stay applied."""
        self._backend._drop_decoder(self.key)

    def release(self, obj: Any) -> None:
        self._backend._forget_model(self.key)
        streamer = streamed.streamer_of(obj)
        if streamer is not None:
            streamer.close(free_pools=True)


def create(ctx: Services) -> LLMBackend:
    return LLMBackend(ctx)
