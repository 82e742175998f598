"""Fixtures for the VLM tests: the tiny demo LLaVA built once per session, a studio context per module, images."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from studio.settings import Settings
from tests import _llm_support

llm_ctx, llm, smol_folder = _llm_support.llm_ctx, _llm_support.llm, _llm_support.smol_folder  # session fixtures


@pytest.fixture(scope="session")
def tiny_llava_folder(shared_cache_dir: Path, smol_folder: Path) -> Path:
    """Built once per session, with the tokenizer of the SmolLM2 folder the Chat tests convert anyway."""
    from backends.vlm.models import ensure_tiny_llava

    return ensure_tiny_llava(shared_cache_dir, smol_folder)


@pytest.fixture(scope="module")
def vlm_ctx(tmp_path_factory, tiny_llava_folder):
    from studio.app import build_context

    root = tmp_path_factory.mktemp("vlm")
    settings = Settings(data_dir=root / "data", models_dir=root / "models", open_browser=False)
    context = build_context(settings)
    shutil.copytree(tiny_llava_folder, settings.cache_dir / "vlm" / tiny_llava_folder.name)
    yield context
    context.jobs.shutdown(timeout=10)


@pytest.fixture(scope="module")
def vlm(vlm_ctx):
    return vlm_ctx.backends.vlm


def solid(path: Path, colour: str, size=(64, 48)) -> str:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return str(path)


def png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h pixels with almost no data: a decompression bomb in miniature."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


def colour_dataset(folder: Path, n_per: int = 2) -> Path:
    """Coloured squares answered with their colour name: a JSONL file and its images."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (c, word) in enumerate([("red", "Red."), ("blue", "Blue."), ("green", "Green.")] * n_per):
        solid(folder / f"{i}.png", c, (32 + i, 32))
        lines.append(json.dumps({"images": [f"{i}.png"], "conversations": [
            {"role": "user", "content": "Which colour is this?"}, {"role": "assistant", "content": word}]}))  # fmt: skip
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "train.jsonl"


def make_tiny_llava_next(target: Path, tokenizer_folder: Path) -> Path:
    """A tiny random LLaVA-NeXT (any-resolution tiles of 28 px) with the demo model's tokenizer and template."""
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,  # fmt: skip
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    from backends.vlm.models import IMAGE_TOKEN, TINY_TEMPLATE

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    grid = [[28, 28], [28, 56], [56, 28], [56, 56]]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=28, patch_size=14, projection_dim=32)  # fmt: skip
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)  # fmt: skip
    cfg = LlavaNextConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                          image_grid_pinpoints=grid, vision_feature_layer=-2, vision_feature_select_strategy="default")  # fmt: skip
    torch.manual_seed(0)
    LlavaNextForConditionalGeneration(cfg).save_pretrained(target)
    images = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=grid)  # fmt: skip
    LlavaNextProcessor(image_processor=images, tokenizer=tok, patch_size=14, chat_template=TINY_TEMPLATE,
                       vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                       num_additional_image_tokens=1).save_pretrained(target)  # fmt: skip
    return target


QWEN_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_qwen25_vl(target: Path, tokenizer_folder: Path) -> Path:
    """A tiny random Qwen2.5-VL (M-RoPE, dynamic resolution up to 448x448 px) with Qwen's vision tokens added."""
    import torch
    from transformers import (
        AutoTokenizer,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,  # fmt: skip
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_folder)
    names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": names})
    start, end, image, video = (tok.convert_tokens_to_ids(t) for t in names)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])  # fmt: skip
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, vocab_size=len(tok), rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]},
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    cfg = Qwen2_5_VLConfig(vision_config=vision, text_config=text, image_token_id=image, video_token_id=video,
                           vision_start_token_id=start, vision_end_token_id=end)  # fmt: skip
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(target)
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                        chat_template=QWEN_TEMPLATE).save_pretrained(target)  # fmt: skip
    return target
