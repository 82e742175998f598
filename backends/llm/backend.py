"""Chat LLM backend: in-process transformers models through the residency manager, or an OpenAI-compatible server.

`chat()` streams `ChatUpdate`s and stops within one token of `cancel` being set; `complete()` is the blocking
helper other capabilities use (e.g. ASR post-editing). On CUDA the decode step runs as a CUDA graph over a static
KV cache (backends/llm/fastdecode.py), with nf4 weights for models above ~3B parameters; on CPU a plain dynamic-cache
loop runs in fp32. Prompts longer than the context are trimmed from the oldest turns with a note (llm_generate.py).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    converted_dir,
    ensure_converted,
    load_causal_lm,
    load_tokenizer,
    resolve_source,
)
from backends.llm.remote import EngineError, OpenAIChatClient, OpenAIEngineConfig
from studio.concurrency import OwnedSlot, SafeStream
from studio.safety import WeightsError, contained_path, safe_filename

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

ENGINES = ("transformers", "openai")
ROLES = ("system", "user", "assistant")
PRECISIONS = ("auto", "nf4", "16bit")
__all__ = [
    "AdapterError", "ChatUpdate", "EngineError", "GenerationOptions", "GenerationStats", "LLMBackend", "LLMConfig",
    "ModelNotAvailable", "WeightsError", "create", "options_for_size",
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
    precision: str = "auto"  # "auto": nf4 above ~3B params on CUDA; "nf4" or "16bit" to force (CPU is always fp32)

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


def check_messages(messages: list[dict[str, str]], *, continuing: bool = False) -> None:
    """Refuse malformed conversations with a message that names the bad value.

    `continuing`: the last message is the assistant's unfinished reply, to be continued.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("No messages: type a message first.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"Message {i} is malformed ({m!r}): expected {{'role': one of {ROLES}, 'content': str}}.")
        if "\x00" in m["content"]:
            raise ValueError(f"Message {i} contains a null byte (\\x00); remove it and send again.")
    if continuing:
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise ValueError("Nothing to continue: the last message is not a reply from the assistant.")
        return
    if messages[-1]["role"] != "user":
        raise ValueError("The last message must be from the user.")
    if not messages[-1]["content"].strip():
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
        self._config = replace(self._config, **changes)
        return self._config

    def recommended_options(self, model_id: str | None = None, **overrides: Any) -> GenerationOptions:
        """Sampling defaults for the model's size (small models: low temperature, repetition penalty, short max)."""
        model_id = model_id or self._config.model_id
        try:
            name = f"{model_id} {self.ctx.catalog.get(model_id).title}"
        except KeyError:
            name = model_id
        return options_for_size(params_from_name(name), **overrides)

    def load_note(self, model_id: str | None = None) -> str:
        """'' when the model is loaded; else what the first reply waits for ('first time: converting, ~30 s')."""
        if self._config.engine == "openai":
            return ""
        try:
            src = self._source(model_id or self._config.model_id)
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
    def _source(self, model_id: str) -> ModelSource:
        """Resolve and register the model; a forced precision gets its own residency key ("chat:<id>@nf4")."""
        precision = self._config.precision
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
        if self._decoder_key and self._decoder_key[0] == key:
            self._decoder, self._decoder_key = None, None

    def release_decode_buffers(self) -> None:
        """Free the static KV cache and CUDA graph of the fast decoder (rebuilt on the next message)."""
        with self._lock:
            self._decoder, self._decoder_key = None, None

    # ---- chat -----------------------------------------------------------------------------------------------
    def chat(
        self,
        messages: list[dict[str, str]],
        options: GenerationOptions | None = None,
        *,
        cancel: threading.Event | None = None,
        continuing: bool = False,
    ) -> Iterator[ChatUpdate]:
        """Stream the assistant's reply to `messages` (the last one from the user). The stream may be stepped on any
        thread and closed from another one (Gradio's Stop): closing stops the running step within a token.

        `continuing`: the last message is an assistant reply; generation goes on from its end (Continue), and
        every update's text includes it.
        """
        return SafeStream(lambda stop: self._chat(messages, options, stop, continuing), cancel)

    def _chat(self, messages: list[dict[str, str]], options: GenerationOptions | None, cancel: Any, continuing: bool):
        opts = options or GenerationOptions()
        check_messages(messages, continuing=continuing)
        if opts.system_prompt.strip() and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": opts.system_prompt}, *messages]
        if self._config.engine == "openai":
            if continuing:
                raise ValueError("Continue works with the in-process engine only; send a message instead.")
            yield from self._chat_remote(messages, opts, cancel)
        else:
            yield from self._chat_local(messages, opts, cancel, continuing)

    def complete(self, messages: list[dict[str, str]], *, max_new_tokens: int = 256, temperature: float = 0.0) -> str:
        opts = GenerationOptions(temperature=temperature, max_new_tokens=max_new_tokens)
        text = ""
        for update in self.chat(messages, opts):
            text = update.text
        return text

    def _chat_remote(self, messages: list, opts: GenerationOptions, cancel: threading.Event | None):
        c = self._config
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

    def _chat_local(self, messages: list, opts: GenerationOptions, cancel: threading.Event | None, continuing: bool):
        t0 = time.perf_counter()
        prefix = messages[-1]["content"] if continuing else ""
        messages = messages[:-1] if continuing else messages
        src = self._source(self._config.model_id)
        tok = self._tokenizer(src)
        working = kv_cache_bytes(self.model_folder(src), self._config.max_context_tokens)
        with self._generation_slot(), self.ctx.residency.use(src.key, working_bytes=working) as model:
            self._apply_adapters(src.key, model)
            limit = min(self._config.max_context_tokens, getattr(model.config, "max_position_embeddings", 1 << 30))
            prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"] if prefix else []
            ids, note = build_prompt(tok, messages, budget=limit - opts.max_new_tokens - len(prefix_ids))
            ids = ids + prefix_ids
            if note:
                yield ChatUpdate(prefix, note=note)
            decoder = self._get_decoder(src.key, model, len(ids) + opts.max_new_tokens, limit)
            stats = GenerationStats(notes=[note] if note else [], load_s=time.perf_counter() - t0)
            text = prefix
            try:
                for piece in stream_tokens(decoder, tok, ids, opts, eos_ids=eos_ids(tok, model), cancel=cancel,
                                           stats=stats):  # fmt: skip
                    text = prefix + piece.text
                    yield ChatUpdate(text, piece.delta)
            except RuntimeError as e:
                if "out of memory" in str(e).lower():
                    raise RuntimeError(
                        f"Out of GPU memory while generating ({len(ids)} prompt tokens): lower max new tokens or "
                        "the context length, or free the GPU in the GPU tab."
                    ) from None
                raise
            self.last_decoder = stats.decoder
            yield ChatUpdate(text, done=True, note=note, stats=stats)

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

    def _get_decoder(self, key: str, model: Any, needed: int, limit: int) -> Any:
        from backends.llm.fastdecode import EagerDecoder, StaticDecoder, bucket_len, model_device

        if model_device(model).type != "cuda" or not self._config.fast_decode:
            return EagerDecoder(model)
        version = self._adapters.get(key, AdapterState()).version
        d = self._decoder
        if d is not None and self._decoder_key == (key, version) and d.matches(model, needed):
            return d
        self._decoder = None  # free the old cache/graph before building the new one
        self._decoder = StaticDecoder(model, bucket_len(needed, limit), use_graph=True)
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

    def attach_adapter(self, folder: str | Path, name: str | None = None) -> str:
        """Load a PEFT adapter onto the current base model and make it active; returns its name."""
        path = self._adapter_path(folder)
        check_adapter_folder(path)
        name = safe_filename(name or path.name, default="adapter")
        src = self._source(self._config.model_id)
        with self._lock:
            state = self._adapters.setdefault(src.key, AdapterState())
            with self.ctx.residency.use(src.key) as model:
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

    def switch_adapter(self, name: str | None) -> None:
        """Activate another attached adapter, or the base model with `None` (detach)."""
        key = self._source(self._config.model_id).key
        with self._lock:
            state = self._adapters.setdefault(key, AdapterState())
            if name is not None and name not in state.paths:
                raise AdapterError(f"No adapter named {name!r} is attached; attached: {sorted(state.paths)}.")
            state.active, state.version = name, state.version + 1

    def detach_adapter(self) -> None:
        self.switch_adapter(None)

    def adapter_status(self) -> tuple[list[str], str | None]:
        key = self._source(self._config.model_id).key
        state = self._adapters.get(key, AdapterState())
        return sorted(state.paths), state.active


def kv_cache_bytes(folder: Path, tokens: int) -> int | None:
    """Working memory of one chat turn: the 16-bit KV cache for `tokens` plus two float32 logits rows."""
    import json

    try:
        c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        c = c.get("text_config", c)
        head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        kv_heads = c.get("num_key_value_heads") or c["num_attention_heads"]
        return 2 * c["num_hidden_layers"] * kv_heads * head_dim * tokens * 2 + 8 * c["vocab_size"]
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
        if self.source.expected_vram_bytes:
            return self.source.expected_vram_bytes
        p = self.source.path
        return p.stat().st_size if p.is_file() else sum(f.stat().st_size for f in p.glob("*.safetensors"))

    def load(self, device: str) -> Any:
        folder = self._backend.model_folder(self.source)
        params = check_model_folder(folder)
        return load_causal_lm(folder, device, params=params, precision=self.precision)

    def release(self, obj: Any) -> None:
        self._backend._forget_model(self.key)


def create(ctx: Services) -> LLMBackend:
    return LLMBackend(ctx)
