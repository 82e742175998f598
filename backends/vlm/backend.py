"""VLM backend: chat about images through the residency manager, with per-image feature caching.

`chat()` streams `VLMUpdate`s and stops within one token of `cancel`. Messages are {"role", "content", "images"}
dicts ("images": file paths or PIL images, any message). Limits, checked before the GPU is touched: at most
`max_images_per_message` images in one message and the family's `max_images` in the prompt (older turns are dropped
to fit, with a note); the prompt, image tokens included, plus max new tokens must fit `max_context_tokens`.
One in-process generation at a time (the static decode buffers are shared); no lock is held between yields
in the caller: the generation runs in a worker thread that owns the slot and the lease (`_in_worker`).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from backends.vlm.adapters import VLMAdapterState
from backends.vlm.images import PreparedImages
from backends.vlm.models import VLMLoader, VLMSource, load_processor, model_folder, read_config, resolve_source
from backends.vlm.types import (
    ROLES,
    Family,
    ImageOptions,
    PreparedImage,
    VLMConfig,
    VLMError,
    VLMStats,
    VLMUpdate,
    family_of,
)
from studio.safety import contained_path

log = logging.getLogger(__name__)
VISION_WORKING_BYTES = 256 * 2**20  # vision tower activations for one image, on top of the KV cache


def check_messages(messages: list[dict[str, Any]], max_per_message: int) -> None:
    if not isinstance(messages, list) or not messages:
        raise VLMError("No messages: type a question about your image first.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content", ""), str):
            raise VLMError(f"Message {i} is malformed: expected {{'role': one of {ROLES}, 'content': str}}.")
        if "\x00" in m.get("content", ""):
            raise VLMError(f"Message {i} contains a null byte (\\x00); remove it and send again.")
    last = messages[-1]
    if last["role"] != "user":
        raise VLMError("The last message must be from the user.")
    if not last.get("content", "").strip():
        raise VLMError("The message is empty: type a question about the image(s), e.g. 'What is in this picture?'.")
    n = len(last.get("images") or [])
    if n > max_per_message:
        raise VLMError(f"The message has {n} images; at most {max_per_message} per message: send fewer.")


class VLMBackend:
    def __init__(self, ctx: Any, config: VLMConfig | None = None) -> None:
        self.ctx = ctx
        self._config = config or VLMConfig()
        self._lock = threading.RLock()
        self._processors: dict[str, Any] = {}
        self._families: dict[str, tuple[str, Family]] = {}
        self.images = PreparedImages()
        self._features: Any = None
        self.adapters: dict[str, VLMAdapterState] = {}
        self._applied: dict[str, tuple[int, int]] = {}
        self._decoder: Any = None
        self._decoder_key: tuple | None = None
        self.last_stats: VLMStats | None = None
        self.training_key: str | None = None  # set while a QLoRA run holds the model (chat then says so at once)

    # ---- configuration and models --------------------------------------------------------------------------------
    @property
    def config(self) -> VLMConfig:
        return self._config

    def configure(self, **changes: Any) -> VLMConfig:
        self._config = replace(self._config, **changes)
        return self._config

    def vlm_models(self) -> list[tuple[Any, bool]]:
        cat = self.ctx.catalog
        return [(s, cat.is_present(s)) for s in cat.by_capability("vlm")]

    def session_config(self, **changes: Any) -> VLMConfig:
        """A config for one browser session (its model, limits), leaving the shared default as it is."""
        return replace(self._config, **changes)

    def source(self, model_id: str | None = None, precision: str | None = None) -> tuple[VLMSource, str]:
        """Resolve a model and register its Loader; returns (source, residency key)."""
        src = resolve_source(self.ctx, model_id or self._config.model_id)
        loader = VLMLoader(self.ctx, src, precision or self._config.precision, self._forget_model)
        if not self.ctx.residency.is_registered(loader.key):
            self.ctx.residency.register(loader)
        return src, loader.key

    def folder(self, src: VLMSource) -> Path:
        return model_folder(self.ctx, src)

    def processor(self, src: VLMSource) -> Any:
        if src.key not in self._processors:
            self._processors[src.key] = load_processor(self.folder(src))
        return self._processors[src.key]

    def family(self, src: VLMSource) -> tuple[str, Family]:
        if src.key not in self._families:  # the demo model is a LLaVA: known without building it (start-up)
            model_type = "llava" if src.demo else read_config(self.folder(src)).get("model_type", "")
            self._families[src.key] = (model_type, family_of(model_type))
        return self._families[src.key]

    def describe(self, model_id: str | None = None) -> dict[str, Any]:
        """What the UI shows about a model: demo or not, image limit, what the resolution setting does, decoder."""
        src, key = self.source(model_id)
        model_type, fam = self.family(src)
        fast = "static cache + CUDA graph on GPU" if fam.fast_decode else f"plain generate ({fam.why_not_fast})"
        return {"title": src.title, "demo": src.demo, "key": key, "model_type": model_type,
                "max_images": fam.max_images, "resolution": fam.resolution, "decoder": fast,
                "feature_cache": fam.feature_cache}  # fmt: skip

    @property
    def features(self) -> Any:
        """The image-feature cache (built on first use: it holds torch tensors)."""
        if self._features is None:
            from backends.vlm.decode import FeatureCache

            self._features = FeatureCache()
        return self._features

    def _forget_model(self, key: str) -> None:
        self._applied.pop(key, None)
        if self._decoder_key and self._decoder_key[0] == key:
            self._decoder, self._decoder_key = None, None

    def adapter_state(self, key: str, src: VLMSource) -> VLMAdapterState:
        if key not in self.adapters:
            self.adapters[key] = VLMAdapterState(projector_name=self.family(src)[1].projector)
        return self.adapters[key]

    def apply_adapters(self, key: str, src: VLMSource, model: Any) -> None:
        state = self.adapter_state(key, src)
        if self._applied.get(key) != (id(model), state.version):
            state.apply(model)
            self._applied[key] = (id(model), state.version)

    # ---- chat ----------------------------------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, Any]], options: Any = None, *, images: ImageOptions | None = None,
             cancel: threading.Event | None = None, config: VLMConfig | None = None) -> Iterator[VLMUpdate]:  # fmt: skip
        """Stream the reply to `messages` (the last from the user); see the module docstring for the limits."""
        from backends.llm import GenerationOptions

        opts = options or GenerationOptions()
        img_opts = images or ImageOptions()
        cfg = config or self._config
        check_messages(messages, cfg.max_images_per_message)
        src, key = self.source(cfg.model_id, cfg.precision)
        if self.training_key == key:
            raise VLMError(f"{src.title} is being trained right now: chat with it when the training ends, or cancel "
                           "the training in the Runs tab.")  # fmt: skip
        _, fam = self.family(src)
        prepared = [[self.images.get(v, img_opts) for v in (m.get("images") or [])] for m in messages]
        notes = [p.note for p in prepared[-1] if p.note]
        messages, prepared, dropped = trim_to_images(messages, prepared, fam.max_images)
        if dropped:
            notes.append(f"Dropped the {dropped} oldest message(s): {src.title} takes at most {fam.max_images} "
                         "images in the conversation.")  # fmt: skip
        if opts.system_prompt.strip() and messages[0]["role"] != "system":
            messages, prepared = [{"role": "system", "content": opts.system_prompt}, *messages], [[], *prepared]
        run = lambda c: self._generate(cfg, src, key, fam, messages, prepared, opts, img_opts, c, notes)  # noqa: E731
        yield from self._in_worker(run, cancel)

    def _in_worker(self, run: Any, cancel: threading.Event | None) -> Iterator[VLMUpdate]:
        """Run a generation in a worker thread that owns the slot and the GPU lease, and relay its updates: the
        caller's generator holds no lock across a yield, and when it is closed (Stop, a closed browser tab) or never
        resumed, the worker still ends within one token and releases everything itself."""
        q: queue.Queue = queue.Queue()
        gone = threading.Event()

        def work() -> None:
            try:
                for update in run(_Either(cancel, gone)):
                    q.put(update)
            except BaseException as e:  # handed to the caller's thread
                q.put(e)
            finally:
                q.put(_END)

        threading.Thread(target=work, name="vlm-chat", daemon=True).start()
        try:
            while (item := q.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            gone.set()

    def _generate(self, cfg, src, key, fam, messages, prepared, opts, img_opts, cancel, notes) -> Iterator[VLMUpdate]:
        from backends.llm import kv_cache_bytes
        from backends.vlm import decode
        from backends.vlm.prompt import build_inputs

        processor = self.processor(src)
        limit = cfg.max_context_tokens
        inputs, digests, dropped = build_inputs(processor, messages, prepared, img_opts,
                                                  budget=limit - opts.max_new_tokens,
                                                  model_type=self.family(src)[0])  # fmt: skip
        if dropped:
            notes.append(f"Dropped the {dropped} oldest message(s) to fit the {limit}-token context.")
        note = " ".join(notes)
        if note:
            yield VLMUpdate("", note=note)
        kv = kv_cache_bytes(self.folder(src), limit) or 0
        stats = VLMStats(notes=notes, images=len(digests))
        with self._slot(), self.ctx.residency.use(key, working_bytes=kv + VISION_WORKING_BYTES) as model:
            self.apply_adapters(key, src, model)
            state = self.adapters[key]
            use_cache = fam.feature_cache and cfg.feature_cache
            pieces = decode.stream_reply(self, key, model, processor, inputs, digests, opts, stats, cancel,
                                         feature_cache=use_cache, fast=fam.fast_decode and cfg.fast_decode,
                                         cache_key=(key, state.active or "", state.version), limit=limit)  # fmt: skip
            text = ""
            for delta, text in pieces:
                yield VLMUpdate(text, delta)
        self.last_stats = stats
        yield VLMUpdate(text, done=True, note=note, stats=stats)

    @contextlib.contextmanager
    def _slot(self, timeout_s: float = 300.0) -> Iterator[None]:
        if not self._lock.acquire(timeout=timeout_s):
            raise VLMError(f"Another reply has been generating for over {timeout_s:.0f} s; press Stop and retry.")
        try:
            yield
        finally:
            self._lock.release()

    # ---- adapters and training ------------------------------------------------------------------------------------
    def adapter_root(self) -> Path:
        return Path(self.ctx.settings.data_dir) / "vlm_adapters"

    def available_adapters(self) -> list[str]:
        """Names of trained adapter folders under data/vlm_adapters/."""
        root = self.adapter_root()
        return sorted(p.name for p in root.glob("*/adapter_config.json") for p in [p.parent]) if root.is_dir() else []

    def attach_adapter(self, name: str) -> str:
        """Load adapter `name` (a folder under data/vlm_adapters/) onto the current model and make it active."""
        from backends.llm import AdapterError, check_adapter_folder, delete_from

        path = contained_path(self.adapter_root(), name)
        try:
            check_adapter_folder(path)
        except AdapterError as e:
            raise VLMError(str(e)) from None
        src, key = self.source()
        with self._slot(), self.ctx.residency.use(key) as model:
            state = self.adapter_state(key, src)
            self.apply_adapters(key, src, model)
            delete_from(model, path.name)
            state._projectors.pop(path.name, None)
            previous = state.active
            state.paths[path.name], state.active, state.version = path, path.name, state.version + 1
            try:
                state.apply(model)
            except AdapterError as e:
                state.paths.pop(path.name)
                state.active = previous if previous in state.paths else None
                state.apply(model)
                raise VLMError(str(e)) from None
            self._applied[key] = (id(model), state.version)
        return path.name

    def switch_adapter(self, name: str | None) -> None:
        """Activate an attached adapter, or the base model with None."""
        src, key = self.source()
        state = self.adapter_state(key, src)
        if name is not None and name not in state.paths:
            self.attach_adapter(name)
            return
        with self._lock:
            state.active, state.version = name, state.version + 1

    def adapter_status(self) -> tuple[list[str], str | None]:
        src, key = self.source()
        state = self.adapter_state(key, src)
        return sorted(state.paths), state.active

    def train(self, cfg: Any, job: Any) -> Any:
        """QLoRA on image-text pairs (backends/vlm/train.py): the job body."""
        from backends.vlm.train import VLMTrainer

        return VLMTrainer(self, cfg, job).run()

    def submit_training(self, cfg: Any) -> Any:
        """Check the dataset now (file:line errors at once), then queue the training as a GPU job."""
        from backends.vlm.data import load_examples

        src, _ = self.source()
        load_examples(cfg.dataset, ImageOptions(max_side=cfg.image_max_side), max_images=self.family(src)[1].max_images)
        return self.ctx.jobs.submit(f"VLM QLoRA {cfg.output_name}", lambda job: self.train(cfg, job), gpu=True)

    def complete(self, messages: list[dict[str, Any]], *, max_new_tokens: int = 32, **kw: Any) -> str:
        """Greedy reply as one string (fixed-image answers before/after training, tests)."""
        from backends.llm import GenerationOptions

        text = ""
        for u in self.chat(messages, GenerationOptions(temperature=0.0, max_new_tokens=max_new_tokens), **kw):
            text = u.text
        return text


_END = object()


class _Either:
    """is_set() when the user's cancel flag or the relay's 'caller gone' flag is set."""

    def __init__(self, a: threading.Event | None, b: threading.Event) -> None:
        self.a, self.b = a, b

    def is_set(self) -> bool:
        return self.b.is_set() or (self.a is not None and self.a.is_set())


def trim_to_images(messages: list, prepared: list[list[PreparedImage]], max_images: int):
    """Drop the oldest messages until the conversation holds at most `max_images` images."""
    dropped = 0
    while sum(len(p) for p in prepared) > max_images and len(messages) > 1:
        messages, prepared, dropped = messages[1:], prepared[1:], dropped + 1
    while messages and messages[0]["role"] == "assistant" and len(messages) > 1:
        messages, prepared, dropped = messages[1:], prepared[1:], dropped + 1
    n = sum(len(p) for p in prepared)
    if n > max_images:
        raise VLMError(f"The message has {n} images but this model takes at most {max_images}: send fewer.")
    return messages, prepared, dropped
