"""The Image tab: imports no torch, shows the demo label, turns bad input into a short gr.Error."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def tab_fns(ctx, shared_cache_dir):
    import shutil

    import gradio as gr

    from backends.image.tiny import ensure_tiny_pipeline
    from tabs.image import TAB

    src = ensure_tiny_pipeline(shared_cache_dir)  # built once per session
    shutil.copytree(src, ctx.settings.cache_dir / "diffusion" / src.name)

    with gr.Blocks() as demo, gr.Tab(TAB.title):
        TAB.build(ctx)
    return {f.name: f.fn for f in demo.fns.values()}


class _Request:
    session_hash = "test-session"


def _args(**over):
    values = dict(model_v="tiny-sd-demo", custom_v="", prompt_v="a red boat", neg_v="", w=64, h=64, steps_v=2,
                  cfg_v=7.0, seed_v=3, batch_v=1, sched_v="Euler a", init_v=None, mask_v=None, strength_v=0.75,
                  l1=None, s1=1.0, l2=None, s2=1.0, l3=None, s3=1.0)  # fmt: skip
    values.update(over)
    return values


def test_generate_event_labels_the_demo_model_and_refuses_bad_sizes(tab_fns):
    import gradio as gr

    generate = tab_fns["generate"]
    shown, status, past, note = generate(**_args(), request=_Request(), progress=lambda f, desc=None: None)
    assert len(shown) == 1 and Path(shown[0][0]).is_file() and shown[0][1] == "seed 3"
    assert "untrained demo model" in status and note["visible"] is True
    assert past and past[0][0] == shown[0][0]
    with pytest.raises(gr.Error, match="multiple of 8"):
        generate(**_args(w=100), request=_Request(), progress=lambda f, desc=None: None)
    with pytest.raises(gr.Error, match="prompt is empty"):
        generate(**_args(prompt_v=""), request=_Request(), progress=lambda f, desc=None: None)
