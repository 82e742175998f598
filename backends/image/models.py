"""Where a diffusion model comes from, and one residency Loader per big component.

Every source ends up as a local diffusers folder (`model_index.json` + one subfolder per component):
- a catalog id: the demo pipelines are built into `cache_dir`; Hub models come from the Models tab's download;
- a local diffusers folder;
- a Hub id ("org/name") already in the Hugging Face cache (nothing is downloaded here);
- a single-file `.safetensors` checkpoint (A1111/ComfyUI style), converted once into `cache_dir`.

The UNet, the VAE and each text encoder is registered with the residency manager as its own key
("diffusion:<id>/unet", ...), so the manager can keep the UNet resident and park idle text encoders in pinned RAM
instead of moving the whole pipeline. Tokenizers and scheduler configs are tiny and stay on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.safety import atomic_folder, check_weights_file, safe_filename, safetensors_numel

log = logging.getLogger(__name__)

ARCH_TITLES = {"sd15": "SD 1.5", "sdxl": "SDXL"}
COMPONENTS = {"sd15": ("text_encoder", "unet", "vae"), "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae")}
TEXT_COMPONENTS = {"sd15": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1}
# Default pipeline configs that diffusers uses for single-file checkpoints (keyed by its model-type guess).
_SINGLE_FILE_ARCH = {"v1": "sd15", "xl_base": "sdxl"}
_SINGLE_FILE_BASE = {"sd15": "sd-1.5", "sdxl": "sdxl-base-1.0"}


class ModelNotAvailable(ValueError):
    """The model is not on this machine (or not a Stable Diffusion 1.5/XL model); the message says what to do."""


@dataclass(frozen=True)
class ModelSource:
    id: str  # short id used in residency keys and file metadata
    title: str
    root: Path  # local diffusers folder
    arch: str  # "sd15" | "sdxl"
    demo: bool = False

    def key(self, component: str) -> str:
        return f"diffusion:{self.id}/{component}"

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS[self.arch]


def read_arch(root: Path) -> str:
    index = root / "model_index.json"
    if not index.is_file():
        raise ModelNotAvailable(f"{root} is not a diffusers folder (no model_index.json).")
    data = json.loads(index.read_text(encoding="utf-8"))
    name = str(data.get("_class_name", ""))
    if "text_encoder_2" in data and data["text_encoder_2"] and data["text_encoder_2"][0] is not None:
        return "sdxl"
    if name.startswith("StableDiffusion") and "3" not in name:
        return "sd15"
    raise ModelNotAvailable(f"{root} holds a {name or 'unknown'} pipeline; only Stable Diffusion 1.x and XL run here.")


def resolve_source(model: str, catalog: Any, cache_dir: Path) -> ModelSource:
    """Turn what the user picked (catalog id, folder, .safetensors file or Hub id) into a local diffusers folder."""
    from backends.image.tiny import TINY_CONFIGS, ensure_tiny_pipeline

    model = (model or "").strip()
    if not model:
        raise ModelNotAvailable("No model chosen: pick one from the list (the demo model always works).")
    try:
        spec = catalog.get(model)
    except KeyError:
        spec = None
    if spec is not None and spec.capability == "diffusion":
        if spec.id in TINY_CONFIGS:
            root = ensure_tiny_pipeline(cache_dir, spec.id)
            return ModelSource(spec.id, spec.title, root, TINY_CONFIGS[spec.id]["arch"], demo=True)
        path = catalog.local_path(spec)
        if path is None:
            raise ModelNotAvailable(
                f"{spec.title} is not downloaded. Download it in the Models tab (needs network once), "
                "or pick the untrained demo model."
            )
        return ModelSource(spec.id, spec.title, Path(path), read_arch(Path(path)))
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(_path_id(path), path.name, path, read_arch(path))
    if path.is_file():
        return _single_file_source(path, catalog, cache_dir)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _hub_cache_source(model)
    raise ModelNotAvailable(
        f"Model {model!r} not found: give a catalog id, a diffusers folder, a .safetensors checkpoint or a Hub id."
    )


def _path_id(path: Path) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]
    return f"{safe_filename(path.stem)[:40]}-{digest}"


def _hub_cache_source(hub_id: str) -> ModelSource:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(hub_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        raise ModelNotAvailable(
            f"{hub_id} is not in the local Hugging Face cache. Download it first (Models tab, or "
            f"`huggingface-cli download {hub_id}`); the studio never downloads while generating."
        ) from None
    return ModelSource(safe_filename(hub_id.replace("/", "--")), hub_id, root, read_arch(root))


def _single_file_source(path: Path, catalog: Any, cache_dir: Path) -> ModelSource:
    """Convert an A1111-style checkpoint into a diffusers folder once (keyed by path, size and mtime)."""
    if path.suffix.lower() != ".safetensors":
        raise ModelNotAvailable(
            f"{path.name}: only .safetensors checkpoints are loaded (a .ckpt is a pickle that can run code). "
            "Convert it to safetensors first."
        )
    check_weights_file(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = Path(cache_dir) / "diffusion" / "converted" / f"{safe_filename(path.stem)[:40]}-{digest}"
    if not (target / "model_index.json").is_file():
        _convert_single_file(path, target, catalog)
    return ModelSource(target.name, path.name, target, read_arch(target))


def _convert_single_file(path: Path, target: Path, catalog: Any) -> None:
    import torch
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type, load_single_file_checkpoint

    from backends.image.tiny import pipeline_class

    try:
        checkpoint = load_single_file_checkpoint(str(path), local_files_only=True)
    except Exception as e:
        raise ModelNotAvailable(f"{path.name} is not a readable checkpoint (truncated or corrupt?): {e}") from None
    arch = _SINGLE_FILE_ARCH.get(infer_diffusers_model_type(checkpoint))
    if arch is None:
        raise ModelNotAvailable(f"{path.name} is not a Stable Diffusion 1.5 or SDXL base checkpoint.")
    base = catalog.get(_SINGLE_FILE_BASE[arch])
    config = catalog.local_path(base) or base.hub_id  # the base model's folder supplies configs and tokenizer
    log.info("converting single-file checkpoint %s (%s) with configs from %s", path, arch, config)
    try:
        pipe = pipeline_class(arch).from_single_file(
            str(path), config=str(config), torch_dtype=torch.float16, local_files_only=True
        )
    except Exception as e:
        raise ModelNotAvailable(
            f"{path.name} needs the configs and tokenizer of {base.title}, which are not on this machine: "
            f"download {base.title} once in the Models tab (detail: {type(e).__name__})."
        ) from None
    with atomic_folder(target) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if ".fp16." not in f.name]
    return plain or files


@dataclass
class ComponentLoader:
    """Residency Loader for one component of one pipeline (safetensors only)."""

    key: str
    root: Path
    component: str
    dtype: Any  # torch.dtype

    def estimate_bytes(self) -> int:
        files = _weight_files(self.root / self.component)
        return sum(safetensors_numel(f) for f in files) * self.dtype.itemsize

    def load(self, device: str) -> Any:
        cls = _component_class(self.root, self.component)
        kwargs: dict[str, Any] = {"subfolder": self.component, "use_safetensors": True, "local_files_only": True}
        kwargs["dtype" if self.component.startswith("text_encoder") else "torch_dtype"] = self.dtype
        if device != "cpu":
            kwargs["device_map"] = device
        model = cls.from_pretrained(str(self.root), **kwargs)
        model.eval().requires_grad_(False)
        log.info("loaded %s onto %s (%s)", self.key, device, self.dtype)
        return model

    def release(self, obj: Any) -> None:
        """Nothing to close: the manager drops its reference and empties the CUDA cache."""


def _component_class(root: Path, component: str) -> Any:
    import diffusers
    import transformers

    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    library, name = index[component]
    module = transformers if library == "transformers" else diffusers
    return getattr(module, name)


def load_cpu_parts(root: Path, arch: str) -> dict[str, Any]:
    """Tokenizers and the scheduler config: small, CPU-only, loaded once per model."""
    from transformers import CLIPTokenizer

    parts: dict[str, Any] = {"tokenizer": CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer")}
    if arch == "sdxl":
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(str(root), subfolder="tokenizer_2")
    parts["scheduler_config"] = json.loads((root / "scheduler" / "scheduler_config.json").read_text("utf-8"))
    parts["unet_config"] = json.loads((root / "unet" / "config.json").read_text("utf-8"))
    parts["vae_config"] = json.loads((root / "vae" / "config.json").read_text("utf-8"))
    return parts
