"""LoRA adapters (PEFT) on a loaded base model: attach, switch, detach, without reloading the base.

Adapters are injected in place through transformers' PEFT integration (`model.load_adapter` / `set_adapter` /
`disable_adapters`), so the residency manager keeps owning the same model object. The wanted state (which adapters,
which one is active) is remembered here and re-applied after the base model was reloaded from disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.llm_models import safetensors_header
from studio.safety import WeightsError

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """An adapter folder is missing, malformed, or does not fit the base model."""


def check_adapter_folder(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise AdapterError(f"Adapter folder not found: {folder}")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{folder} has no adapter_config.json; it is not a PEFT adapter folder.")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{folder} has no adapter_model.safetensors (pickled .bin adapters are not loaded).")
    try:
        safetensors_header(weights)
    except WeightsError as e:
        raise AdapterError(str(e)) from None
    return cfg


def find_adapters(roots: list[Path], max_depth: int = 4) -> list[Path]:
    """Folders holding adapter_config.json under `roots` (bounded depth, sorted)."""
    found: list[Path] = []
    for root in roots:
        if not root.is_dir():
            continue
        for cfg in root.rglob("adapter_config.json"):
            if len(cfg.relative_to(root).parts) <= max_depth + 1:
                found.append(cfg.parent)
    return sorted(set(found))


@dataclass
class AdapterState:
    """What the user asked for on one base model: loaded adapters by name and the active one (None = base)."""

    paths: dict[str, Path] = field(default_factory=dict)
    active: str | None = None
    version: int = 0  # bumped on every change; decoders captured for an older version are rebuilt

    def apply(self, model: Any) -> None:
        """Bring `model` to this state (re-attaching adapters lost when the base was reloaded from disk)."""
        loaded = loaded_adapters(model)
        for name, path in self.paths.items():
            if name not in loaded:
                load_into(model, name, path)
        if not loaded_adapters(model):
            return
        if self.active is None:
            model.disable_adapters()
        else:
            model.enable_adapters()
            model.set_adapter(self.active)


def loaded_adapters(model: Any) -> set[str]:
    if not getattr(model, "_hf_peft_config_loaded", False):
        return set()
    return set(getattr(model, "peft_config", {}) or {})


def load_into(model: Any, name: str, path: Path) -> None:
    check_adapter_folder(path)
    try:
        model.load_adapter(str(path), adapter_name=name)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        if name in loaded_adapters(model):
            model.delete_adapter(name)
        raise AdapterError(
            f"Adapter {path.name!r} does not fit this base model (another base model or rank?): "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    log.info("attached adapter %s from %s", name, path)


def delete_from(model: Any, name: str) -> None:
    if name in loaded_adapters(model):
        model.delete_adapter(name)
