"""Loading chat models for the residency manager: the `Loader` of one chat model (files checked, a GGUF converted
once, the precision policy), its size before the first load, and the working memory of one chat turn."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from backends.llm import streamed
from backends.llm.models import ModelSource, check_model_folder, choose_precision, load_causal_lm

log = logging.getLogger(__name__)


class ModelOwner(Protocol):
    """What a loader needs of the chat backend (LLMBackend): the folder to load, the context length (a partial
    load sizes its KV cache by it), and word of an eviction (its decoder buffers go) or a release."""

    ctx: Any

    @property
    def config(self) -> Any: ...

    def model_folder(self, src: ModelSource) -> Path: ...

    def _drop_decoder(self, key: str) -> None: ...

    def _forget_model(self, key: str) -> None: ...


def kv_cache_bytes(folder: Path, tokens: int) -> int | None:
    """Working memory of one chat turn: the 16-bit KV cache for `tokens` plus two float32 logits rows."""
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

    def __init__(self, source: ModelSource, backend: ModelOwner, precision: str = "auto") -> None:
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
        return self.precision in ("auto", "nf4") and streamed.can_stream(self.source.path)

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
