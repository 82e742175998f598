"""Input guards shared by tabs: checks that must run before Gradio's own preprocessing touches an upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.safety import check_image_file


def guard_image(component: Any) -> Any:
    """Check an image upload's header before Gradio opens it: a corrupt file or one over 89 megapixels gets our
    clear message (Gradio's own is a generic 'Error'; PIL only warns between 89 and 178 megapixels)."""
    import gradio as gr

    original = component.preprocess

    def preprocess(payload: Any) -> Any:
        for item in _files(payload):
            path = getattr(item, "path", None)
            if path and not str(getattr(item, "url", "") or "").startswith("data:"):
                try:
                    check_image_file(path)
                except ValueError as e:
                    shown = getattr(item, "orig_name", None) or Path(path).name
                    raise gr.Error(str(e).replace(Path(path).name, shown)) from None
        return original(payload)

    component.preprocess = preprocess
    return component


def _files(payload: Any) -> list[Any]:
    """The uploaded files of an Image payload (itself) or an ImageEditor payload (background, layers, composite)."""
    if payload is None:
        return []
    if hasattr(payload, "background"):  # gr.ImageEditor's EditorData
        return [payload.background, *(getattr(payload, "layers", None) or []), getattr(payload, "composite", None)]
    return [payload]
