"""Image tab: Stable Diffusion 1.5 / SDXL generation (txt2img, img2img, inpainting, LoRAs), gallery, LoRA training.

UI only: the work is in backends.image.diffusion and backends.image.lora_train (training lives in tabs/image_train.py). Offline, the
only model is an untrained demo pipeline; every result made with it says "untrained demo model".
"""

from __future__ import annotations

import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab

log = logging.getLogger(__name__)

LORA_SLOTS = 3
DEMO_NOTE = (
    "**Untrained demo model.** No diffusion weights can be installed offline, so this is a tiny random-weight "
    "pipeline with the Stable Diffusion architecture: it makes noise-like pictures. Download Stable Diffusion 1.5 "
    "or SDXL in the Models tab (or give a folder / .safetensors checkpoint) for real images."
)


def _message(e: Exception) -> str:
    """Backend errors already say what was wrong and what to do; keep them short."""
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 400 else text[:400] + "…"


def _lora_choices(ctx: StudioContext) -> list[str]:
    return [str(p) for p in ctx.backends.sd_lora.list_loras()]


def _gallery_items(ctx: StudioContext) -> list[tuple[str, str]]:
    return [(str(it.path), it.caption) for it in ctx.backends.diffusion.gallery(60)]


def build(ctx: StudioContext) -> None:
    from backends.image import SCHEDULERS
    from tabs.image_train import build_training

    diffusion = ctx.backends.diffusion
    stops: dict[str, threading.Event] = {}
    gr.Markdown(
        "## Image\nStable Diffusion 1.5 and SDXL: text to image, image to image and inpainting, with LoRAs. The "
        "text encoders, UNet and VAE are managed separately, so on a small card the UNet stays on the GPU while the "
        "text encoders wait in RAM. Every PNG carries its prompt, seed and settings."
    )
    demo_note = gr.Markdown(DEMO_NOTE)
    with gr.Row():
        with gr.Column(scale=1):
            model = gr.Dropdown(diffusion.model_choices(), value=diffusion.config.default_model, label="Model")
            custom = gr.Textbox("", label="…or a diffusers folder, a .safetensors checkpoint, or a Hub id in the cache")
            prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a lighthouse on a cliff at dusk, oil painting")
            negative = gr.Textbox(label="Negative prompt", lines=2, placeholder="blurry, low quality")
            with gr.Row():
                width = gr.Slider(64, 2048, 512, step=8, label="Width")
                height = gr.Slider(64, 2048, 512, step=8, label="Height")
            with gr.Row():
                steps = gr.Slider(1, 150, 25, step=1, label="Steps")
                guidance = gr.Slider(0, 30, 7.0, step=0.5, label="Guidance (CFG)")
            with gr.Row():
                seed = gr.Number(-1, precision=0, label="Seed (-1 = random)")
                batch = gr.Slider(1, 8, 1, step=1, label="Images")
                scheduler = gr.Dropdown(list(SCHEDULERS), value="Euler a", label="Scheduler")
            with gr.Accordion("Image to image / inpainting", open=False):
                init = gr.Image(type="filepath", label="Init image (img2img)")
                mask = gr.Image(type="filepath", image_mode="L", label="Mask for inpainting (white = repaint)")
                strength = gr.Slider(0.05, 1.0, 0.75, step=0.05, label="Strength (how much to change)")
            with gr.Accordion("LoRAs", open=False):
                lora_upload = gr.File(label="Add a LoRA (.safetensors)", file_types=[".safetensors"])
                lora_rows = []
                for i in range(LORA_SLOTS):
                    with gr.Row():
                        path = gr.Dropdown(
                            _lora_choices(ctx), value=None, label=f"LoRA {i + 1}", allow_custom_value=True
                        )
                        scale = gr.Slider(-2, 2, 1.0, step=0.05, label="Scale")
                    lora_rows.append((path, scale))
            with gr.Row():
                go = gr.Button("Generate", variant="primary")
                stop = gr.Button("Stop")
        with gr.Column(scale=1):
            status = gr.Markdown("Write a prompt and press Generate.")
            images = gr.Gallery(label="Result", columns=2, height=520, format="png")
    with gr.Accordion("Gallery of past images", open=False):
        refresh = gr.Button("Refresh")
        past = gr.Gallery(_gallery_items(ctx), label="Past images (newest first)", columns=6, height=420)
        params = gr.JSON(label="Parameters of the selected image")
    with gr.Accordion("Train a LoRA", open=False):
        build_training(ctx, diffusion)

    def generate(model_v, custom_v, prompt_v, neg_v, w, h, steps_v, cfg_v, seed_v, batch_v, sched_v, init_v, mask_v,
                 strength_v, l1, s1, l2, s2, l3, s3, request: gr.Request,
                 progress=gr.Progress()):  # noqa: B008  # fmt: skip
        from backends.image import GenerateRequest, GenerationCancelled, LoraChoice

        flag = stops.setdefault(request.session_hash or "-", threading.Event())
        flag.clear()
        try:
            loras = tuple(LoraChoice(str(p), float(sc)) for p, sc in ((l1, s1), (l2, s2), (l3, s3)) if p)
            req = GenerateRequest(
                prompt_v or "", negative_prompt=neg_v or "", model=(custom_v or "").strip() or model_v,
                width=int(w), height=int(h), steps=int(steps_v), guidance=float(cfg_v),
                seed=None if seed_v is None or int(seed_v) < 0 else int(seed_v), batch=int(batch_v),
                scheduler=sched_v, init_image=init_v or None, mask_image=mask_v or None, strength=float(strength_v),
                loras=loras,
            )  # fmt: skip
            result = diffusion.generate(req, progress=lambda f, m: progress(f, desc=m), should_stop=flag.is_set)
        except GenerationCancelled as e:
            return gr.update(), f"Stopped. {e}", gr.update(), gr.update()
        except Exception as e:
            log.info("image generation refused or failed: %s", e)
            raise gr.Error(_message(e)) from None
        shown = [(str(im.path), f"seed {im.seed}") for im in result.images]
        head = f"**{result.label}** · {result.seconds:.1f} s · seeds {', '.join(str(i.seed) for i in result.images)}"
        note = gr.update(visible=result.demo)
        return shown, head, _gallery_items(ctx), note

    def request_stop(request: gr.Request):
        flag = stops.get(request.session_hash or "-")
        if flag is not None:
            flag.set()
        return "Stopping after the current step…"

    def add_lora(file_v):
        if not file_v:
            return [gr.update() for _ in range(LORA_SLOTS)]
        from studio.safety import check_upload_size, contained_path, safe_filename

        src = Path(file_v)
        if src.suffix.lower() != ".safetensors":
            raise gr.Error(f"{src.name}: only .safetensors LoRAs are accepted (convert .pt/.ckpt files first).")
        check_upload_size(src, ctx.settings.max_upload_mb * 2**20)
        folder = ctx.settings.outputs_dir / "loras"
        folder.mkdir(parents=True, exist_ok=True)
        target = contained_path(folder, safe_filename(src.stem, "lora") + ".safetensors")
        shutil.copyfile(src, target)
        choices = _lora_choices(ctx)
        return [gr.update(choices=choices, value=str(target) if i == 0 else None) for i in range(LORA_SLOTS)]

    def show_params(evt: gr.SelectData) -> dict[str, Any]:
        from backends.image import read_png_params

        items = diffusion.gallery(60)
        return read_png_params(items[evt.index].path) if evt.index < len(items) else {}

    lora_inputs = [c for row in lora_rows for c in row]
    inputs = [model, custom, prompt, negative, width, height, steps, guidance, seed, batch, scheduler, init, mask,
              strength, *lora_inputs]  # fmt: skip
    go.click(generate, inputs, [images, status, past, demo_note], concurrency_id="gpu", concurrency_limit=1)
    stop.click(request_stop, None, status)
    lora_upload.upload(add_lora, lora_upload, [row[0] for row in lora_rows])
    refresh.click(lambda: _gallery_items(ctx), None, past)
    past.select(show_params, None, params)
    model.change(lambda m: gr.update(visible=m in ("tiny-sd-demo", "tiny-sdxl-demo")), model, demo_note)


TAB = Tab("Image", build)
