"""Vision tab: YOLO detection on images, videos and the webcam; segmentation and classification; training on your
own data (imported from labelling tools); export (ONNX, TensorRT, OpenVINO) and the latency table.

UI only: every model call goes through `ctx.backends.detection`; no torch import here.
"""

from __future__ import annotations

from typing import Any

from studio.context import StudioContext, Tab
from tabs._inputs import guard_image
from tabs._session import choices_update, on_page_load
from tabs.vision_tasks import model_choices

IMG_SIZES = [320, 416, 480, 640, 800, 960, 1280]
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError)


def _model_choices(det: Any, *, with_weights: bool = False) -> list[tuple[str, str]]:
    return [(m.title, m.id) for m in det.models() if not (with_weights and m.path is None)]


def model_list_update(det: Any, current: str | None, task: str = "detect", default: str | None = None) -> Any:
    """A task's model list as it is now (trainings and added weights since the page was built), keeping the pick."""
    return choices_update(model_choices(det, task), current, default)


def _options(conf: float, iou: float, classes: list[str] | None, imgsz: int, names: dict[int, str]) -> Any:
    from backends.vision import DetectOptions

    ids = tuple(sorted(k for k, v in names.items() if v in (classes or []))) or None
    return DetectOptions(conf=float(conf), iou=float(iou), classes=ids, imgsz=int(imgsz))


def _build_models(ctx: StudioContext, det: Any) -> Any:
    import gradio as gr

    from backends.vision import TRUST_WARNING

    with gr.Row():
        model = gr.Dropdown(_model_choices(det), value="yolov8s-person", label="Model", scale=4)
        refresh = gr.Button("Refresh list", size="sm", scale=1)
    with gr.Accordion("Load your own .pt weights", open=False):
        gr.Markdown(
            f"⚠️ {TRUST_WARNING} Put the file in one of those folders on the studio's computer, then pick it here. "
            "The studio loads your own trainings (below) without asking."
        )
        with gr.Row():
            path = gr.Dropdown([], label=".pt file in a trusted folder", scale=4)
            find = gr.Button("Find files", scale=1)
            add = gr.Button("Add", scale=1)

    def add_file(p: str | None):
        if not p:
            raise gr.Error("Choose a .pt file first (press 'Find files' to list the trusted folders).")
        try:
            entry = det.add_trusted_weights(p)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        return gr.update(choices=_model_choices(det), value=entry.id)

    find.click(lambda: gr.update(choices=[str(f) for f in det.trusted_files()], value=None), None, path)

    def listing(v: str | None) -> Any:
        return model_list_update(det, v, default="yolov8s-person")

    refresh.click(listing, model, model)
    add.click(add_file, path, model, api_name="vision_add_weights")
    on_page_load(listing, model, model, queue=False)  # a reload lists the trainings made since the page was built
    return model


def _class_update(det: Any, model_id: str, keep: list[str] | None = None):
    """Class names of the chosen model (loads it, so only on a model change or when the list is opened)."""
    import gradio as gr

    try:
        names = list(det.class_names(model_id).values())
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return gr.update(choices=names, value=[c for c in keep or [] if c in names])


def result_summary(det: Any, model_id: str, res: Any) -> str:
    """Counts per class, timing, and which classes this model knows (the default one finds people only)."""
    from collections import Counter

    counts = Counter(b.name for b in res.boxes)
    found = ", ".join(f"{n} {name}" for name, n in counts.most_common()) or "nothing"
    names = list(det.class_names(model_id).values())
    known = ", ".join(names[:12]) + (f" … ({len(names)} classes)" if len(names) > 12 else "")
    note = "  \n⚠️ Untrained model: its boxes are random." if det.get_model(model_id).untrained else ""
    if set(names) == {"Normal", "Fall"}:
        note += (
            "  \nThis model detects **people** only, as *Normal* (standing, sitting) or *Fall* (lying): it was "
            "fine-tuned from YOLOv8s for fall detection, so buses, cars or dogs are not found. Train your own "
            "classes in the Train tab, or download a COCO model in the Models tab."
        )
    return (
        f"**Found {found}** in {res.inference_ms:.0f} ms on {res.width}x{res.height} · "
        f"classes of this model: {known}{note}"
    )


def _build_image(det: Any, model: Any, conf: Any, iou: Any, classes: Any, imgsz: Any, queue: dict) -> None:
    import gradio as gr

    with gr.Row():
        # a file path, so a truncated upload reaches our decoder and its clear message (Gradio's would be generic)
        image = guard_image(gr.Image(type="filepath", image_mode=None, label="Image", sources=["upload", "clipboard"]))
        annotated = gr.Image(type="numpy", label="Detections", interactive=False)
    detect = gr.Button("Detect", variant="primary")
    summary = gr.Markdown()
    table = gr.Dataframe(headers=["class", "confidence", "x1", "y1", "x2", "y2"], interactive=False)
    json_file = gr.File(label="Detections as JSON", interactive=False)

    def run(model_id, img, c, i, cls, size):
        if img is None:
            raise gr.Error("Upload an image first.")
        try:
            res = det.detect(model_id, img, _options(c, i, cls, size, det.class_names(model_id)))
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        text = result_summary(det, model_id, res)
        return res.image, text, res.rows(), str(det.save_json(res, "image"))

    detect.click(
        run,
        [model, image, conf, iou, classes, imgsz],
        [annotated, summary, table, json_file],
        api_name="vision_detect",
        **queue,
    )


def _build_video(det: Any, model: Any, conf: Any, iou: Any, classes: Any, imgsz: Any, queue: dict) -> None:
    import gradio as gr

    with gr.Row():
        video = gr.Video(label="Video", sources=["upload"])
        out = gr.Video(label="Annotated video (WebM)", interactive=False)
    with gr.Row():
        stride = gr.Slider(1, 30, value=2, step=1, label="Detect every N-th frame (boxes are held in between)")
        start = gr.Button("Detect in video", variant="primary")
        stop = gr.Button("Stop")
    status = gr.Markdown()
    json_file = gr.File(label="Per-frame detections (JSON)", interactive=False)

    def run(model_id, path, c, i, cls, size, n):
        if not path:
            raise gr.Error("Upload a video first.")
        try:
            opts = _options(c, i, cls, size, det.class_names(model_id))
            for p in det.detect_video(model_id, path, opts, stride=int(n)):
                total = f"/{p.frames_total}" if p.frames_total else ""
                text = f"frame {p.frames_read}{total} · {p.frames_detected} detected · {p.boxes} boxes"
                if p.output is None:
                    yield text, gr.skip(), gr.skip()
                else:
                    yield "Done: " + text, str(p.output), str(p.json_path)
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    event = start.click(
        run,
        [model, video, conf, iou, classes, imgsz, stride],
        [status, out, json_file],
        api_name="vision_video",
        **queue,
    )
    stop.click(None, None, None, cancels=[event])


def _build_webcam(det: Any, model: Any, conf: Any, iou: Any, classes: Any, queue: dict) -> None:
    import gradio as gr

    gr.Markdown("Frames are sent about every 0.3 s and detected at 320 px to keep up; the browser asks for the camera.")
    with gr.Row():
        cam = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Webcam")
        out = gr.Image(type="numpy", label="Detections", interactive=False)

    def frame(model_id, img, c, i, cls):
        if img is None:
            return gr.skip()
        try:
            return det.detect(model_id, img, _options(c, i, cls, 320, det.class_names(model_id))).image
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None

    cam.stream(frame, [model, cam, conf, iou, classes], out, stream_every=0.3, time_limit=600, **queue)


def build(ctx: StudioContext) -> None:
    import gradio as gr

    from tabs.vision_export import build_export
    from tabs.vision_tasks import build_task
    from tabs.vision_train import build_train

    det = ctx.backends.detection
    gr.Markdown(
        "## Vision — YOLO detection, segmentation and classification\nThe offline default is a real YOLOv8s "
        "fine-tuned on people (classes *Normal* / *Fall*). Import a Label Studio, CVAT or Roboflow export and train "
        "on it in the Train section; untrained models (also the Segment and Classify demo models) are for training "
        "from scratch and their output is random."
    )
    model = _build_models(ctx, det)
    queue = ctx.queues.event_kwargs("Vision")  # the shared GPU queue, or this tab's own on a machine without one
    with gr.Row():
        conf = gr.Slider(0.01, 1.0, value=0.25, step=0.01, label="Confidence")
        iou = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="IoU (NMS overlap)")
        classes = gr.Dropdown([], multiselect=True, label="Only these classes (empty = all)")
        imgsz = gr.Dropdown(IMG_SIZES, value=640, label="Image size")
    model.change(lambda m: _class_update(det, m), model, classes)
    classes.focus(lambda m, keep: _class_update(det, m, keep), [model, classes], classes)
    with gr.Tab("Image"):
        _build_image(det, model, conf, iou, classes, imgsz, queue)
    with gr.Tab("Video"):
        _build_video(det, model, conf, iou, classes, imgsz, queue)
    with gr.Tab("Webcam"):
        _build_webcam(det, model, conf, iou, classes, queue)
    with gr.Tab("Segment"):
        build_task(ctx, det, "segment")
    with gr.Tab("Classify"):
        build_task(ctx, det, "classify")
    with gr.Tab("Train"):
        build_train(ctx, det, model)
    with gr.Tab("Export"):
        build_export(ctx, det, model)


TAB = Tab("Vision", build)
