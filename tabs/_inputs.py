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
        path = getattr(payload, "path", None)
        if path and not str(getattr(payload, "url", "") or "").startswith("data:"):
            try:
                check_image_file(path)
            except ValueError as e:
                shown = getattr(payload, "orig_name", None) or Path(path).name
                raise gr.Error(str(e).replace(Path(path).name, shown)) from None
        return original(payload)

    component.preprocess = preprocess
    return component
