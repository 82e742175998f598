"""Vision tab, Segment and Classify sections: Ultralytics' seg and cls tasks on one image, masks drawn, top-k shown.

Offline there are no COCO/ImageNet weights: the lists start with untrained demo models built from Ultralytics'
yaml (their masks and classes are random, and the UI says so), then the user's own trainings of that task
(Train section) and .pt files of that task from the trusted folders. UI only: no torch.
"""

from __future__ import annotations

from typing import Any

from studio.context import StudioContext
from tabs._inputs import guard_image
from tabs._session import choices_update, on_page_load

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError)
TITLES = {"segment": "Segment", "classify": "Classify"}


def model_choices(det: Any, task: str = "detect") -> list[tuple[str, str]]:
    """(title, id) of every model of `task` usable now: a Dropdown's choices."""
    return [(m.title, m.id) for m in det.models(task)]


def summary(det: Any, model_id: str, res: Any) -> str:
    entry = det.get_model(model_id)
    warn = (
        "  \n⚠️ **Untrained demo model** (random weights, built from yaml): its "
        + ("masks" if entry.task == "segment" else "classes")
        + " are noise. Train one on your data in the Train section (pick a *-seg* or *-cls* start)."
        if entry.untrained
        else ""
    )
    if res.task == "classify":
        best = ", ".join(f"{n} {p:.2f}" for n, p in res.top[:3])
        return f"**Top classes:** {best} · {res.inference_ms:.0f} ms on {res.width}x{res.height}{warn}"
    return (
        f"**{res.masks} masks** ({len(res.boxes)} boxes) in {res.inference_ms:.0f} ms on {res.width}x{res.height}{warn}"
    )


def run_task(det: Any, task: str, model_id: str, img: str | None, conf: float, size: int, k: int):
    import gradio as gr

    from backends.vision import DetectOptions

    if img is None:
        raise gr.Error("Upload an image first.")
    if not model_id:
        raise gr.Error(f"Choose a {task} model first.")
    try:
        if det.get_model(model_id).task != task:
            raise gr.Error(f"{model_id} is not a {task} model; pick one from this list.")
        res = det.detect(model_id, img, DetectOptions(conf=float(conf), imgsz=int(size)), top_k=int(k))
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return res.image, summary(det, model_id, res), res.rows(), str(det.save_json(res, task))


def add_weights(det: Any, task: str, path: str | None):
    import gradio as gr

    if not path:
        raise gr.Error("Choose a .pt file first (press 'Find files' to list the trusted folders).")
    try:
        entry = det.add_trusted_weights(path, task=task)
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return gr.update(choices=model_choices(det, task), value=entry.id)


def build_task(ctx: StudioContext, det: Any, task: str) -> None:
    import gradio as gr

    queue = ctx.queues.event_kwargs("Vision")
    choices = model_choices(det, task)
    with gr.Row():
        model = gr.Dropdown(choices, value=choices[0][1] if choices else None, label=f"{TITLES[task]} model", scale=4)
        refresh = gr.Button("Refresh list", size="sm", scale=1)
    with gr.Accordion(f"Load your own {task} .pt weights", open=False), gr.Row():
        path = gr.Dropdown([], label=".pt file in a trusted folder", scale=4)
        find = gr.Button("Find files", scale=1)
        add = gr.Button("Add", scale=1)
    with gr.Row():
        image = guard_image(gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"]))
        annotated = gr.Image(type="numpy", label="Masks" if task == "segment" else "Top classes", interactive=False)
    with gr.Row():
        conf = gr.Slider(0.0, 1.0, value=0.25, step=0.01, label="Confidence", visible=task == "segment")
        size = gr.Dropdown([224, 320, 480, 640], value=640 if task == "segment" else 224, label="Image size")
        k = gr.Slider(1, 10, value=5, step=1, label="Top-k classes", visible=task == "classify")
    go = gr.Button(TITLES[task], variant="primary")
    text = gr.Markdown()
    headers = ["class", "probability"] if task == "classify" else ["class", "confidence", "x1", "y1", "x2", "y2"]
    table = gr.Dataframe(headers=headers, interactive=False)
    json_file = gr.File(label="Result as JSON", interactive=False)
    go.click(lambda *a: run_task(det, task, *a), [model, image, conf, size, k], [annotated, text, table, json_file],
             api_name=f"vision_{task}", **queue)  # fmt: skip

    def listing(v: str | None) -> Any:  # the list as it is now: trainings and added weights since the page was built
        return choices_update(model_choices(det, task), v)

    refresh.click(listing, model, model)
    on_page_load(listing, model, model, queue=False)
    find.click(lambda: gr.update(choices=[str(f) for f in det.trusted_files()], value=None), None, path)
    add.click(lambda p: add_weights(det, task, p), path, model)
