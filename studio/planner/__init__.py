"""VRAM planner (torch-free): will this job fit on this card, what does each part cost, and what to change if not.

Modules: models (ModelInfo from presets, config.json + safetensors headers, diffusers folders, GGUF headers), tasks
(the jobs: Chat, LoraTrain, ImageGen, ImageLora, DetectTrain, Transcribe), formulas (bytes by part per family),
plan (verdict, ranked advice, the offload split for models larger than the card, OOM advice), store (measured
footprints, persisted, correcting each family's formula), service (VramPlanner: what the residency manager owns).
"""

from studio.planner.formulas import kv_bytes, layer_bytes, llm_weights, parts_for, qlora_parts
from studio.planner.models import PRESETS, ModelInfo, ModelInfoError, from_config, preset, read_gguf, read_model
from studio.planner.plan import FITS, FITS_WITH, NO_FIT, Advice, Estimate, OffloadSplit, offload_split, oom_advice, plan
from studio.planner.service import VramPlanner, family_of
from studio.planner.store import Footprint, FootprintStore
from studio.planner.tasks import TASKS_FOR, Chat, DetectTrain, ImageGen, ImageLora, LoraTrain, Task, Transcribe

__all__ = [
    "FITS", "FITS_WITH", "NO_FIT", "PRESETS", "TASKS_FOR", "Advice", "Chat", "DetectTrain", "Estimate", "Footprint",
    "FootprintStore", "ImageGen", "ImageLora", "LoraTrain", "ModelInfo", "ModelInfoError", "OffloadSplit", "Task",
    "Transcribe", "VramPlanner", "family_of", "from_config", "kv_bytes", "layer_bytes", "llm_weights", "offload_split",
    "oom_advice", "parts_for", "plan", "preset", "qlora_parts", "read_gguf", "read_model",
]  # fmt: skip
