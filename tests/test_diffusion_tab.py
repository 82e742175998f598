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


def _flag():
    from tabs._session import StopFlag

    return StopFlag()


def _args(**over):
    values = dict(model_v="tiny-sd-demo", custom_v="", prompt_v="a red boat", neg_v="", w=64, h=64, steps_v=2,
                  cfg_v=7.0, seed_v=3, batch_v=1, sched_v="Euler a", editor_v=None, strength_v=0.75,
                  l1=None, s1=1.0, l2=None, s2=1.0, l3=None, s3=1.0)  # fmt: skip
    values.update(over)
    return values


def test_generate_event_labels_the_demo_model_and_refuses_bad_sizes(tab_fns):
    import gradio as gr

    generate = tab_fns["generate"]
    shown, status, past, note = generate(**_args(), flag=_flag(), progress=lambda f, desc=None: None)
    assert len(shown) == 1 and Path(shown[0][0]).is_file() and shown[0][1] == "seed 3"
    assert "untrained demo model" in status and note["visible"] is True
    assert past and past[0][0] == shown[0][0]
    with pytest.raises(gr.Error, match="multiple of 8"):
        generate(**_args(w=100), flag=_flag(), progress=lambda f, desc=None: None)
    with pytest.raises(gr.Error, match="prompt is empty"):
        generate(**_args(prompt_v=""), flag=_flag(), progress=lambda f, desc=None: None)


def test_png_info_reuse_seed_send_to_img2img_and_brush_mask(tab_fns, tmp_path):
    import gradio as gr
    from PIL import Image

    from tabs import image

    shown, *_ = tab_fns["generate"](**_args(seed_v=7), flag=_flag(), progress=lambda f, desc=None: None)
    path = shown[0][0]
    params, text = image.png_info(path)
    assert params["seed"] == 7 and params["prompt"] == "a red boat" and "Seed: 7" in text
    assert image.params_to_form(params)[0] == "a red boat"
    assert image.reuse_seed(None, shown) == 7
    editor, _ = image.send_to_img2img(None, shown)
    assert editor["background"] == path
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert image.png_info(str(plain))[1].startswith("No generation parameters")
    with pytest.raises(gr.Error, match="Generate an image first"):
        image.reuse_seed(None, [])
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (10, 10, 30, 30))
    init, mask = image.editor_images({"background": Image.open(path), "layers": [layer], "composite": None})
    assert init.mode == "RGB" and mask.getbbox() == (10, 10, 30, 30)
    assert image.editor_images({"background": Image.open(path), "layers": [Image.new("RGBA", (64, 64))]})[1] is None
    shown2, *_ = tab_fns["generate"](**_args(editor_v={"background": Image.open(path), "layers": [layer]}),
                                              flag=_flag(), progress=lambda f, desc=None: None)  # fmt: skip
    assert image.png_info(shown2[0][0])[0]["mode"] == "inpaint"
