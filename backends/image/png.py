"""PNG files with their generation parameters, and the gallery of past images.

Each image carries two text chunks: `parameters` in the AUTOMATIC1111 format (so other SD tools and image
viewers show the prompt, seed and settings) and `onecard` with the same values as JSON (what the studio reads back).
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.safety import atomic_write_bytes

log = logging.getLogger(__name__)

IMAGES_SUBDIR = "images"


@dataclass(frozen=True)
class GalleryItem:
    path: Path
    params: dict[str, Any]

    @property
    def caption(self) -> str:
        p = self.params
        prompt = str(p.get("prompt", ""))[:60]
        return f"{prompt} · seed {p.get('seed', '?')}" if p else self.path.name


def a1111_parameters(p: dict[str, Any]) -> str:
    """'prompt\\nNegative prompt: ...\\nSteps: 25, Sampler: ..., CFG scale: 7, Seed: 1, Size: 512x512, Model: ...'."""
    fields = [
        ("Steps", p.get("steps")),
        ("Sampler", p.get("scheduler")),
        ("CFG scale", p.get("guidance")),
        ("Seed", p.get("seed")),
        ("Size", f"{p.get('width')}x{p.get('height')}"),
        ("Model", p.get("model")),
        ("Denoising strength", p.get("strength") if p.get("mode") != "txt2img" else None),
        ("Lora hashes", ", ".join(f"{lo['name']}: {lo['scale']}" for lo in p.get("loras", [])) or None),
    ]
    text = str(p.get("prompt", ""))
    if p.get("negative_prompt"):
        text += f"\nNegative prompt: {p['negative_prompt']}"
    return text + "\n" + ", ".join(f"{k}: {v}" for k, v in fields if v not in (None, ""))


def save_png(image: Any, path: Path, params: dict[str, Any]) -> None:
    """Write `image` as PNG with its parameters, atomically."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("onecard", json.dumps(params, default=str))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    atomic_write_bytes(path, buf.getvalue())


def read_png_params(path: Path) -> dict[str, Any]:
    """The studio's parameters stored in a PNG ({} when there are none or the file is not a readable PNG)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            raw = im.text.get("onecard") if hasattr(im, "text") else None
    except (OSError, UnidentifiedImageError):
        return {}
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {}


def list_gallery(outputs_dir: Path, limit: int = 60) -> list[GalleryItem]:
    """Past images, newest first."""
    root = Path(outputs_dir) / IMAGES_SUBDIR
    if not root.is_dir():
        return []
    files = sorted(root.rglob("*.png"), key=lambda f: f.stat().st_mtime, reverse=True)[:limit]
    return [GalleryItem(f, read_png_params(f)) for f in files]
