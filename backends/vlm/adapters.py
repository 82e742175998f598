"""VLM adapters from the VLM tab's QLoRA: a PEFT LoRA on the language model plus the trained projector.

Folder layout: `adapter_config.json` + `adapter_model.safetensors` (a plain PEFT LoRA, injected in place through
backends/llm/adapters.py, as in Chat) and `projector.safetensors` (the projector's full weights). Switching
adapters never reloads the base model: LoRA layers are re-routed, and the projector's weights are copied in from the
adapter or back from a CPU copy of the base projector taken the first time the model was seen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from backends.llm import AdapterState
from studio.safety import load_safetensors

log = logging.getLogger(__name__)
PROJECTOR_FILE = "projector.safetensors"


def projector_module(model: Any, name: str) -> Any:
    """The module `name` ("model.multi_modal_projector"), or None when the model has none."""
    try:
        return model.get_submodule(name) if name else None
    except AttributeError:
        return None


def projector_state(module: Any) -> dict[str, Any]:
    """The projector's own weights (LoRA tensors excluded) detached to the CPU."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items() if "lora_" not in k}


def load_projector(module: Any, state: dict[str, Any]) -> None:
    import torch

    own = module.state_dict()
    missing = [k for k in own if "lora_" not in k and k not in state]
    if missing or any(k not in own or own[k].shape != v.shape for k, v in state.items()):
        from backends.llm import AdapterError

        raise AdapterError(f"projector weights do not fit this model (missing {missing[:2]}, or other shapes)")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].device, own[k].dtype))


@dataclass
class VLMAdapterState(AdapterState):
    """Chat's adapter state (LoRA names -> folders, the active one) plus the projector: the base copy and each
    adapter's trained weights."""

    projector_name: str = ""
    base_projector: dict[str, Any] | None = None
    _projectors: dict[str, dict[str, Any]] = field(default_factory=dict)

    def remember_base(self, model: Any) -> None:
        module = projector_module(model, self.projector_name)
        if self.base_projector is None and module is not None:
            self.base_projector = projector_state(module)

    def apply(self, model: Any) -> None:
        self.remember_base(model)
        super().apply(model)  # LoRA layers re-attached and routed
        module = projector_module(model, self.projector_name)
        if module is None:
            return
        state = self.base_projector
        if self.active is not None:
            state = self._projector_of(self.active) or state
        if state is not None:
            load_projector(module, state)

    def _projector_of(self, name: str) -> dict[str, Any] | None:
        if name not in self._projectors:
            f = self.paths[name] / PROJECTOR_FILE
            self._projectors[name] = load_safetensors(f) if f.is_file() else {}
        return self._projectors[name] or None
