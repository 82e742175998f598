"""Stable Diffusion architectures from configs: the real SD1.5/SDXL shapes (benchmarks) and tiny demo pipelines.

No diffusion weights can be installed offline, so the Image tab's offline default is a tiny random-initialised
pipeline with the real SD1.5 (or SDXL) *architecture*: the same classes, a few channels each. It is built once
with a fixed seed and saved as a diffusers folder of safetensors under `cache_dir`, so every run of the studio
and every test sees the same weights. It makes noise-like pictures and is labelled "untrained demo model".

The CLIP tokenizer is built here too (a byte-level BPE vocabulary of 256 byte symbols, no merges), because the
real 49,408-token vocabulary is not available offline. Real checkpoints bring their own tokenizer.

`SD15_CONFIGS` / `SDXL_CONFIGS` are the configs of stable-diffusion-v1-5 and stable-diffusion-xl-base-1.0,
copied from their model repositories, so the benchmark can build architecture-true models with random weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from studio.safety import atomic_folder

log = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the tiny configs change, so an old cache is rebuilt
_SCHED_COMMON = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "prediction_type": "epsilon",
}
_CLIP_L = {  # openai/clip-vit-large-patch14 text tower (SD1.5 and SDXL's first encoder)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "max_position_embeddings": 77,
    "vocab_size": 49408,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
_VAE_REAL = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
}

SD15_CONFIGS: dict[str, Any] = {
    "arch": "sd15",
    "unet": {
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 64,
    },
    "vae": {**_VAE_REAL, "sample_size": 512, "scaling_factor": 0.18215},
    "text_encoder": {**_CLIP_L, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "scheduler": ("PNDMScheduler", _SCHED_COMMON),
}

SDXL_CONFIGS: dict[str, Any] = {
    "arch": "sdxl",
    "unet": {
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280],
        "cross_attention_dim": 2048,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "projection_class_embeddings_input_dim": 2816,
        "sample_size": 128,
        "transformer_layers_per_block": [1, 2, 10],
        "use_linear_projection": True,
    },
    "vae": {**_VAE_REAL, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "text_encoder": {**_CLIP_L, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "text_encoder_2": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_attention_heads": 20,
        "num_hidden_layers": 32,
        "max_position_embeddings": 77,
        "vocab_size": 49408,
        "hidden_act": "gelu",
        "projection_dim": 1280,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": ("EulerDiscreteScheduler", {**_SCHED_COMMON, "timestep_spacing": "leading"}),
}

# Tiny configs: the same block types, a few channels. The VAE keeps four levels so images are 8x the latents,
# exactly like the real models (sizes must be divisible by 8).
_TINY_VAE = {
    "block_out_channels": [16, 16, 32, 32],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
_TINY_CLIP = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
}
TINY_SD15_CONFIGS: dict[str, Any] = {
    "arch": "sd15",
    "unet": {
        "attention_head_dim": 8,
        "block_out_channels": [32, 64],
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 8,
    },
    "vae": _TINY_VAE,
    "text_encoder": _TINY_CLIP,
    "scheduler": ("PNDMScheduler", _SCHED_COMMON),
}
TINY_SDXL_CONFIGS: dict[str, Any] = {
    "arch": "sdxl",
    "unet": {
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "attention_head_dim": [2, 4],
        "block_out_channels": [32, 64],
        "cross_attention_dim": 64,  # hidden sizes of the two text encoders, concatenated
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six time ids x 8 + pooled text (32)
        "sample_size": 8,
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
    },
    "vae": {**_TINY_VAE, "force_upcast": True},
    "text_encoder": _TINY_CLIP,
    "text_encoder_2": {**_TINY_CLIP, "hidden_act": "gelu"},
    "scheduler": ("EulerDiscreteScheduler", {**_SCHED_COMMON, "timestep_spacing": "leading"}),
}
TINY_CONFIGS = {"tiny-sd-demo": TINY_SD15_CONFIGS, "tiny-sdxl-demo": TINY_SDXL_CONFIGS}


def build_tokenizer():
    """A CLIP tokenizer over raw bytes (no merges): every text maps to known ids, offline."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _text_config(cfg: dict[str, Any], tokenizer):
    from transformers import CLIPTextConfig

    ids = {}
    if tokenizer is not None:  # tiny models: the special ids of our own tokenizer
        ids = {
            "vocab_size": len(tokenizer),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
    return CLIPTextConfig(**{**cfg, **ids})


def build_component(configs: dict[str, Any], name: str, dtype: Any, device: str, tokenizer=None) -> Any:
    """One random-initialised component, created directly on `device` ("meta" counts parameters for free)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    classes = {"unet": UNet2DConditionModel.from_config, "vae": AutoencoderKL.from_config}
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)  # created in the target dtype: no fp32 copy on the way
    try:
        with torch.device(device):
            if name in classes:
                model = classes[name](configs[name])
            else:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                model = cls(_text_config(configs[name], tokenizer))
    finally:
        torch.set_default_dtype(before)
    return model.eval().requires_grad_(False)


def build_components(configs: dict[str, Any], *, tokenizer=None, dtype=None, device: str = "cpu") -> dict[str, Any]:
    """Random-initialised components of one architecture, created directly on `device` (fast on a GPU).

    `tokenizer=None` keeps the configs' own vocabulary size (benchmarks); pass the tiny tokenizer for demos.
    """
    import diffusers

    out: dict[str, Any] = {"tokenizer": tokenizer if tokenizer is not None else build_tokenizer()}
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if name in configs:
            out[name] = build_component(configs, name, dtype, device, tokenizer)
    if "text_encoder_2" in configs:
        out["tokenizer_2"] = out["tokenizer"]
    sched_name, sched_cfg = configs["scheduler"]
    out["scheduler"] = getattr(diffusers, sched_name).from_config(sched_cfg)
    return out


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def assemble_pipeline(arch: str, components: dict[str, Any]):
    """A txt2img pipeline object around existing components (no copies, no device moves)."""
    cls = pipeline_class(arch)
    if arch == "sdxl":
        return cls(**components)
    return cls(**components, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def ensure_tiny_pipeline(cache_dir: Path, model_id: str = "tiny-sd-demo") -> Path:
    """The diffusers folder of a tiny demo pipeline, built (seed 0) and saved as safetensors on first use."""
    import torch

    if model_id not in TINY_CONFIGS:
        raise KeyError(f"unknown tiny model {model_id!r}; known: {sorted(TINY_CONFIGS)}")
    target = Path(cache_dir) / "diffusion" / f"{model_id}-v{TINY_VERSION}"
    if (target / "model_index.json").is_file():
        return target
    configs = TINY_CONFIGS[model_id]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        pipe = assemble_pipeline(configs["arch"], build_components(configs, tokenizer=tokenizer))
    with atomic_folder(target, replace=False) as tmp:  # replace=False: another process may have won the race
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "onecard_demo.json").write_text(json.dumps({"model": model_id, "untrained_demo": True}))
    log.info("built the %s untrained demo pipeline in %s", model_id, target)
    return target


def write_skeleton(root: Path, configs: dict[str, Any]) -> Path:
    """A diffusers folder with configs and tokenizers but no weights (benchmarks build the weights on the GPU)."""
    root = Path(root)
    arch = configs["arch"]
    index: dict[str, Any] = {
        "_class_name": pipeline_class(arch).__name__,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", configs["scheduler"][0]],
    }
    if "text_encoder_2" in configs:
        index.update(
            text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
            tokenizer_2=["transformers", "CLIPTokenizer"],
        )
    for name, cls_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps({"_class_name": cls_name, **configs[name]}))
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    sched_name, sched_cfg = configs["scheduler"]
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": sched_name, **sched_cfg}))
    tokenizer = build_tokenizer()
    for name in ("tokenizer", "tokenizer_2") if "text_encoder_2" in configs else ("tokenizer",):
        tokenizer.save_pretrained(str(root / name))
    (root / "model_index.json").write_text(json.dumps(index))
    return root
