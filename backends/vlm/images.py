"""Checking and preparing uploaded images before any model sees them (torch-free).

Policy: every upload goes through `studio.safety.open_image` (header size check against 100 MP before decoding, full
decode so truncation fails here, "not an image" for renamed zips); animated images use their first frame, with a
note; transparency is flattened on white; the image is downscaled (never upscaled) so its long side is at most the
user's `max_side`. The digest is the SHA-256 of the prepared pixels, so one image uploaded twice under two names
shares its cached features, and a different resolution setting gets its own entry.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from backends.vlm.types import ImageOptions, PreparedImage, VLMError
from studio.safety import ImageFileError, open_image


def to_rgb(image: Any) -> Any:
    from PIL import Image

    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")


def fit_side(image: Any, max_side: int) -> Any:
    from PIL import Image

    w, h = image.size
    if max(w, h) <= max_side:
        return image
    scale = max_side / max(w, h)
    return image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)


def prepare_image(value: Any, options: ImageOptions, *, what: str = "image") -> PreparedImage:
    """A path or PIL image -> a checked, RGB, downscaled image with its digest."""
    from PIL import Image, ImageOps

    notes = []
    if isinstance(value, Image.Image):
        image, name, frames = value, what, getattr(value, "n_frames", 1)
    else:
        path = Path(str(value))
        try:
            image = open_image(path, what=what, draft=options.max_side)
        except ImageFileError as e:
            raise VLMError(str(e)) from None
        name, frames = path.name, image.info.get("frames", 1)
    if frames > 1:
        notes.append(f"{name} is animated ({frames} frames): the model sees its first frame only.")
    w, h = image.size
    if min(w, h) < 1:
        raise VLMError(f"The {what} ({name}) has no pixels ({w}x{h}).")
    image = fit_side(to_rgb(ImageOps.exif_transpose(image)), options.max_side)
    if image.size != (w, h):
        notes.append(f"{name} was downscaled from {w}x{h} to {image.size[0]}x{image.size[1]} (image max side setting).")
    digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
    return PreparedImage(image, digest, name, " ".join(notes))


class PreparedImages:
    """Bounded cache path -> PreparedImage, so images kept in the history are not decoded again every turn."""

    def __init__(self, max_items: int = 64) -> None:
        self._items: OrderedDict[tuple, PreparedImage] = OrderedDict()
        self._lock = threading.Lock()
        self.max_items = max_items

    def get(self, value: Any, options: ImageOptions) -> PreparedImage:
        if not isinstance(value, str | Path):
            return prepare_image(value, options)
        path = Path(value)
        try:
            st = path.stat()
        except OSError:
            raise VLMError(f"The image {path.name} is no longer on disk: upload it again.") from None
        key = (str(path), st.st_mtime_ns, st.st_size, options)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        prepared = prepare_image(path, options)
        with self._lock:
            self._items[key] = prepared
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return prepared
