"""Settings tab: every setting with its current value and description, and how to change it."""

from __future__ import annotations

from studio.context import StudioContext, Tab


def build(ctx: StudioContext) -> None:
    import gradio as gr

    rows = [
        [name, "" if value is None else str(value), desc] for name, value, desc in ctx.settings.field_descriptions()
    ]
    gr.Markdown(
        "## Settings\nSet them in `studio.toml` (in the folder you launch from), as `STUDIO_<NAME>` environment "
        "variables, or as `launch.py` flags (`--vram-cap-gb 10`); later sources win. Misspelled keys are refused "
        "with a suggestion. The VRAM cap can also be changed live in the GPU tab."
    )
    gr.Dataframe(rows, headers=["setting", "value", "description"], interactive=False, wrap=True)


TAB = Tab("Settings", build)
