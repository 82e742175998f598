"""A tab whose capability is not built yet: it says so plainly and shows no fake output."""

from __future__ import annotations

from studio.context import StudioContext, Tab


def not_built_tab(title: str, what_it_will_do: str) -> Tab:
    def build(ctx: StudioContext) -> None:
        import gradio as gr

        gr.Markdown(
            f"## {title}\n\n**Not built yet.** {what_it_will_do}\n\n"
            "Nothing in this tab runs today; it is listed so you can see what the studio is growing into."
        )

    return Tab(title, build)
