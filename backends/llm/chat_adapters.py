"""The chat backend's LoRA adapters: PEFT adapters attached to a base model, one active at a time, switched per reply.

State per base model (residency key): an `AdapterState` (attached paths, the active name, a version bumped on every
change). Switching only bumps the version; the next generation applies it to the leased model (`_apply_adapters`), so
a model evicted and reloaded gets its adapters back, and the fast decoder, keyed by (model, version), is rebuilt.
Adapter folders must lie inside the data or models folder (no user-given path leaves them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from backends.llm.adapters import AdapterError, AdapterState, check_adapter_folder, delete_from, find_adapters
from studio.safety import contained_path, safe_filename


class ChatAdapters:
    """Mixin of LLMBackend: its adapter API. Uses the backend's `ctx`, `_config`, `_lock` (the generation slot),
    `_source()`, and owns `_adapters` (key -> AdapterState) and `_applied` (key -> (id(model), version) applied)."""

    ctx: Any
    _config: Any
    _lock: Any
    _adapters: dict[str, AdapterState]
    _applied: dict[str, tuple[int, int]]

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
