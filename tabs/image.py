"""Image tab: Stable Diffusion 1.5 / SDXL generation (txt2img, img2img, inpainting, LoRAs), gallery, LoRA training.

UI only: the work is in backends.image.diffusion and backends.image.lora_train (training lives in tabs/image_train.py). Offline, the
only model is an untrained demo pipeline; every result made with it says "untrained demo model".
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import gradio as gr

from studio.context import StudioContext, Tab
from tabs._inputs import guard_image
from tabs._session import StopFlag, bind, waiting_note

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


def checked_model_and_loras(ctx: StudioContext, custom: str, loras: list[str]) -> None:
    """A request may name a server path only inside the folders the owner allows: custom models in the models
    folder or `trusted_model_dirs`, LoRAs there or among the uploaded/trained ones (outputs/loras)."""
    from studio.safety import allowed_path

    s = ctx.settings
    c = (custom or "").strip()
    hub_id = c.count("/") == 1 and not c.startswith((".", "/", "~")) and not Path(c).exists()
    if c and not hub_id:
        allowed_path(c, s.model_dirs(), what="model path")
    for p in loras:
        allowed_path(p, ((s.outputs_dir / "loras").resolve(), *s.model_dirs()), what="LoRA file")


def _gallery_items(ctx: StudioContext) -> list[tuple[str, str]]:
    return [(str(it.path), it.caption) for it in ctx.backends.diffusion.gallery(60)]


PARAM_FIELDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance", "seed", "scheduler")


def editor_images(value: Any) -> tuple[Any, Any]:
    """(init image, mask or None) from the ImageEditor: the background is the init image, brush strokes the mask."""
    if not value or value.get("background") is None:
        return None, None
    from PIL import Image

    background = value["background"]
    background = Image.open(background) if isinstance(background, str) else background
    mask = None
    for layer in value.get("layers") or []:
        layer = Image.open(layer) if isinstance(layer, str) else layer
        alpha = layer.convert("RGBA").getchannel("A").point(lambda a: 255 if a > 0 else 0)
        mask = alpha if mask is None else Image.fromarray(__import__("numpy").maximum(mask, alpha))
    if mask is not None and mask.getbbox() is None:
        mask = None  # a layer with nothing painted: plain img2img
    return background.convert("RGB"), mask


def png_info(path: str | None) -> tuple[dict[str, Any], str]:
    """(the studio's parameters, the A1111-style 'parameters' text) of any PNG; explains when there are none."""
    from PIL import Image, UnidentifiedImageError

    from backends.image import read_png_params

    if not path:
        return {}, ""
    try:
        with Image.open(path) as im:
            text = (getattr(im, "text", None) or {}).get("parameters", "")
    except (UnidentifiedImageError, OSError) as e:
        raise gr.Error(f"{Path(path).name} is not a readable image ({e}).") from None
    params = read_png_params(Path(path))
    if not params and not text:
        return {}, "No generation parameters in this file (it was not made by the studio or AUTOMATIC1111)."
    return params, text


def params_to_form(params: dict[str, Any]):
    """Fill the form from a PNG's parameters (prompt, size, steps, guidance, seed, scheduler)."""
    if not params:
        raise gr.Error("No studio parameters to use: read a PNG made by the studio first.")
    return tuple(gr.skip() if params.get(k) is None else params[k] for k in PARAM_FIELDS)


def pick_result(evt: gr.SelectData, images: list | None):
    """The image selected in the result gallery (its file path)."""
    items = images or []
    if evt.index is None or evt.index >= len(items):
        return None
    item = items[evt.index]
    return item[0] if isinstance(item, list | tuple) else getattr(item, "image", item)


def _path_of(item: Any) -> str | None:
    if isinstance(item, list | tuple):
        item = item[0]
    if isinstance(item, dict):
        item = item.get("image", {}).get("path") if isinstance(item.get("image"), dict) else item.get("path")
    return getattr(item, "path", item) if item else None


def selected_or_first(picked: str | None, images: list | None) -> str:
    path = picked or (_path_of(images[0]) if images else None)
    if not path:
        raise gr.Error("Generate an image first (or pick one in the result).")
    return str(path)


def send_to_img2img(picked, images):
    path = selected_or_first(picked, images)
    return {"background": path, "layers": [], "composite": path}, gr.update(open=True)


def reuse_seed(picked, images):
    from backends.image import read_png_params

    seed = read_png_params(Path(selected_or_first(picked, images))).get("seed")
    if seed is None:
        raise gr.Error("That image carries no seed in its PNG metadata.")
    return int(seed)


def generate(ctx, model_v, custom_v, prompt_v, neg_v, w, h, steps_v, cfg_v, seed_v, batch_v, sched_v, editor_v,
             strength_v, l1, s1, l2, s2, l3, s3, flag, progress=gr.Progress()):  # noqa: B008  # fmt: skip
    from backends.image import GenerateRequest, GenerationCancelled, LoraChoice

    diffusion = ctx.backends.diffusion
    flag.clear()
    try:
        init, mask = editor_images(editor_v)
        loras = tuple(LoraChoice(str(p), float(sc)) for p, sc in ((l1, s1), (l2, s2), (l3, s3)) if p)
        checked_model_and_loras(ctx, custom_v, [c.path for c in loras])
        req = GenerateRequest(
            prompt_v or "", negative_prompt=neg_v or "", model=(custom_v or "").strip() or model_v,
            width=int(w), height=int(h), steps=int(steps_v), guidance=float(cfg_v),
            seed=None if seed_v is None or int(seed_v) < 0 else int(seed_v), batch=int(batch_v),
            scheduler=sched_v, init_image=init, mask_image=mask, strength=float(strength_v), loras=loras,
        )  # fmt: skip
        with ctx.queues.hold(ctx.queues.queue_id("Image"), "image generation (Image)"):
            result = diffusion.generate(req, progress=lambda f, m: progress(f, desc=m), should_stop=flag.is_set)
    except GenerationCancelled as e:
        return gr.update(), f"Stopped. {e}", gr.update(), gr.update()
    except Exception as e:
        log.info("image generation refused or failed: %s", e)
        raise gr.Error(_message(e)) from None
    shown = [(str(im.path), f"seed {im.seed}") for im in result.images]
    head = f"**{result.label}** · {result.seconds:.1f} s · seeds {', '.join(str(i.seed) for i in result.images)}"
    return shown, head, _gallery_items(ctx), gr.update(visible=result.demo)


def request_stop(flag):
    flag.set()
    return "Stopping after the current step…"


def add_lora(ctx, file_v):
    if not file_v:
        return [gr.update() for _ in range(LORA_SLOTS)]
    from studio.safety import atomic_path, check_upload_size, contained_path, safe_filename, safetensors_header

    src = Path(file_v)
    if src.suffix.lower() != ".safetensors":
        raise gr.Error(f"{src.name}: only .safetensors LoRAs are accepted (convert .pt/.ckpt files first).")
    try:  # checked before it is stored: a complete safetensors file whose tensors are LoRA weights
        check_upload_size(src, ctx.settings.max_upload_mb * 2**20)
        keys = [k for k in safetensors_header(src) if k != "__metadata__"]
    except ValueError as e:
        raise gr.Error(str(e)) from None
    if not any("lora" in k.lower() for k in keys):
        raise gr.Error(f"{src.name} holds no LoRA weights (no 'lora' tensors among {len(keys)}); pick a LoRA file.")
    folder = ctx.settings.outputs_dir / "loras"
    target = contained_path(folder, safe_filename(src.stem, "lora") + ".safetensors")
    with atomic_path(target) as tmp:
        shutil.copyfile(src, tmp)
    choices = _lora_choices(ctx)
    return [gr.update(choices=choices, value=str(target) if i == 0 else None) for i in range(LORA_SLOTS)]


def show_params(ctx, index: int) -> dict[str, Any]:
    from backends.image import read_png_params

    items = ctx.backends.diffusion.gallery(60)
    return read_png_params(items[index].path) if index < len(items) else {}


def _build_form(ctx: StudioContext, diffusion: Any) -> dict[str, Any]:
    from backends.image import SCHEDULERS

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
    with gr.Accordion("Image to image / inpainting", open=False) as init_box:
        editor = guard_image(gr.ImageEditor(
            type="pil", label="Init image (img2img); paint over what to repaint (inpainting)",
            brush=gr.Brush(colors=["#ffffff"], default_size=32, color_mode="fixed"), transforms=(), height=380,
        ))  # fmt: skip
        strength = gr.Slider(0.05, 1.0, 0.75, step=0.05, label="Strength (how much to change)")
    with gr.Accordion("LoRAs", open=False):
        lora_upload = gr.File(label="Add a LoRA (.safetensors)", file_types=[".safetensors"])
        lora_rows = []
        for i in range(LORA_SLOTS):
            with gr.Row():
                path = gr.Dropdown(_lora_choices(ctx), value=None, label=f"LoRA {i + 1}", allow_custom_value=True)
                scale = gr.Slider(-2, 2, 1.0, step=0.05, label="Scale")
            lora_rows.append((path, scale))
    with gr.Row():
        go = gr.Button("Generate", variant="primary")
        stop = gr.Button("Stop")
    return locals()


def _build_result() -> dict[str, Any]:
    status = gr.Markdown("Write a prompt and press Generate.")
    images = gr.Gallery(label="Result", columns=2, height=520, format="png")
    with gr.Row():
        to_img2img = gr.Button("Send to img2img", size="sm")
        seed_btn = gr.Button("Reuse seed", size="sm")
    with gr.Accordion("PNG info: read the parameters of any PNG", open=False):
        png_file = guard_image(gr.Image(type="filepath", label="PNG made by the studio or AUTOMATIC1111", format="png"))
        png_text = gr.Textbox(label="Parameters (AUTOMATIC1111 format)", lines=4)
        png_params = gr.JSON(label="Studio parameters")
        png_to_form = gr.Button("Send parameters to the form", size="sm")
    return locals()


def build(ctx: StudioContext) -> None:
    from tabs.image_train import build_training

    diffusion = ctx.backends.diffusion
    gr.Markdown(
        "## Image\nStable Diffusion 1.5 and SDXL: text to image, image to image and inpainting, with LoRAs. The "
        "text encoders, UNet and VAE are managed separately, so on a small card the UNet stays on the GPU while the "
        "text encoders wait in RAM. Every PNG carries its prompt, seed and settings."
    )
    demo_note = gr.Markdown(DEMO_NOTE)
    flag, picked = gr.State(StopFlag()), gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            f = _build_form(ctx, diffusion)
        with gr.Column(scale=1):
            r = _build_result()
    with gr.Accordion("Gallery of past images", open=False):
        refresh = gr.Button("Refresh")
        past = gr.Gallery(_gallery_items(ctx), label="Past images (newest first)", columns=6, height=420)
        params = gr.JSON(label="Parameters of the selected image")
    with gr.Accordion("Train a LoRA", open=False):
        build_training(ctx, diffusion)

    lora_rows = f["lora_rows"]
    inputs = [f[k] for k in ("model", "custom", "prompt", "negative", "width", "height", "steps", "guidance", "seed",
                             "batch", "scheduler", "editor", "strength")]  # fmt: skip
    inputs += [c for row in lora_rows for c in row] + [flag]
    f["go"].click(bind(waiting_note, ctx, "Image"), None, r["status"], queue=False)  # says why, if it must wait
    f["go"].click(bind(generate, ctx), inputs, [r["images"], r["status"], past, demo_note],
                  **ctx.queues.event_kwargs("Image"))  # fmt: skip
    f["stop"].click(request_stop, flag, r["status"], queue=False)
    f["lora_upload"].upload(bind(add_lora, ctx), f["lora_upload"], [row[0] for row in lora_rows])
    refresh.click(lambda: _gallery_items(ctx), None, past)

    def on_past_select(evt: gr.SelectData):  # a closure: Gradio injects `evt` by its annotation
        return show_params(ctx, evt.index)

    past.select(on_past_select, None, params)
    f["model"].change(lambda m: gr.update(visible=m in ("tiny-sd-demo", "tiny-sdxl-demo")), f["model"], demo_note)
    r["images"].select(pick_result, r["images"], picked, queue=False)
    r["images"].change(lambda: None, None, picked, queue=False)  # a new result: nothing selected
    r["to_img2img"].click(send_to_img2img, [picked, r["images"]], [f["editor"], f["init_box"]], queue=False)
    r["seed_btn"].click(reuse_seed, [picked, r["images"]], f["seed"], queue=False)
    r["png_file"].change(png_info, r["png_file"], [r["png_params"], r["png_text"]], queue=False)
    form = [f[k] for k in ("prompt", "negative", "width", "height", "steps", "guidance", "seed", "scheduler")]
    r["png_to_form"].click(params_to_form, r["png_params"], form, queue=False)


TAB = Tab("Image", build)
