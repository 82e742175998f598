"""LoRA adapters (PEFT) on a loaded base model: attach, switch, detach, without reloading the base.

Adapters are injected in place with PEFT's low-level API (`inject_adapter_in_model` + `set_peft_model_state_dict`,
then `set_adapter` / `enable_adapters` on every tuner layer), so the residency manager keeps owning the same model
object and no wrapper is needed. (transformers' own `model.load_adapter` would do the same but insists on a newer
PEFT than the pinned one.) The wanted state (which adapters, which one is active) is remembered here and re-applied
after the base model was reloaded from disk.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.safety import WeightsError, safetensors_header

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
        if loaded_adapters(model):
            activate(model, self.active)


def _tuner_layers(model: Any) -> list[Any]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def loaded_adapters(model: Any) -> set[str]:
    return set(getattr(model, "peft_config", None) or {})


def activate(model: Any, name: str | None) -> None:
    """Route every adapted layer through adapter `name`, or through the base weights only (None)."""
    for layer in _tuner_layers(model):
        if name is None:
            layer.enable_adapters(False)
            continue
        layer.enable_adapters(True)
        try:
            layer.set_adapter(name, inference_mode=True)
        except TypeError:  # older PEFT: no inference_mode argument
            layer.set_adapter(name)


def load_into(model: Any, name: str, path: Path) -> None:
    """Inject adapter `name` from `path` into `model` in place; on any mismatch undo and raise AdapterError."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    check_adapter_folder(path)
    try:
        config = PeftConfig.from_pretrained(str(path))
        config.inference_mode = True
        if not isinstance(getattr(model, "peft_config", None), dict):
            model.peft_config = {}
        model.peft_config[name] = config
        with warnings.catch_warnings():  # "Already found a `peft_config` attribute": that is our registry
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(config, model, adapter_name=name)
        device = str(model.get_input_embeddings().weight.device)
        result = set_peft_model_state_dict(model, load_peft_weights(str(path), device=device), adapter_name=name)
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
        if unexpected:
            raise ValueError(f"{len(unexpected)} adapter tensors match no layer, e.g. {unexpected[0]}")
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as e:
        delete_from(model, name)
        raise AdapterError(
            f"Adapter {path.name!r} does not fit this base model (another base model or rank?): "
            f"{str(e).splitlines()[0][:300]}"
        ) from None
    log.info("attached adapter %s from %s", name, path)


def delete_from(model: Any, name: str) -> None:
    for layer in _tuner_layers(model):
        if name in getattr(layer, "peft_config", {}) or name in _layer_adapter_names(layer):
            layer.delete_adapter(name)
    if isinstance(getattr(model, "peft_config", None), dict):
        model.peft_config.pop(name, None)


def _layer_adapter_names(layer: Any) -> set[str]:
    names: set[str] = set()
    for attr in getattr(layer, "adapter_layer_names", ()):
        names.update(getattr(layer, attr, {}).keys())
    return names
