"""Vision tab, Train and Export sections: dataset check, training job with live plots, ONNX export + latency.

UI only (no torch). Training runs as a background job: closing the browser does not stop it; its run shows in
the Runs tab, and this section polls the job and the run's metrics every 2 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.context import StudioContext
from tabs._session import bind, job_status, newest_first

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError)
LOSSES = ("box_loss", "cls_loss", "dfl_loss")
MAPS = ("map50", "map50_95")


def _source(det: Any, zip_path: str | None, folder: str | None) -> Path:
    import gradio as gr

    if zip_path:
        return Path(zip_path)
    if folder and folder.strip():
        try:
            return det.check_dataset_folder(folder)  # only folders the owner's settings allow
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
    raise gr.Error("Give the dataset: upload a .zip or type a folder path.")


def _plots(ctx: StudioContext, det: Any, job_id: str | None):
    """(loss frame, mAP frame) with float columns, or None while empty (the plot keeps the axis types it first
    sees, and an empty object column makes the y-axis categorical)."""
    import pandas as pd

    run_id = det.job_runs.get(job_id) if job_id else None
    rows = ctx.runs.get(run_id).metrics() if run_id else []
    frames = []
    for keys in (LOSSES, MAPS):
        long = [{"epoch": float(r["step"]), "value": float(r[k]), "series": k} for r in rows for k in keys
                if isinstance(r.get(k), int | float)]  # fmt: skip
        frame = pd.DataFrame(long, columns=["epoch", "value", "series"])
        frames.append(None if frame.empty else frame.astype({"epoch": "float64", "value": "float64"}))
    return frames[0], frames[1]


def _start(det: Any, source: Path, values: dict[str, Any]):
    import gradio as gr

    from backends.vision import TrainOptions

    try:
        opts = TrainOptions(
            base=values["base"],
            epochs=int(values["epochs"]),
            imgsz=int(values["imgsz"]),
            batch=int(values["batch"]),
            patience=int(values["patience"]),
            seed=int(values["seed"]),
            augment=bool(values["augment"]),
            amp=bool(values["amp"]),
        )
        job = det.start_training(source, opts)
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return job.id, f"Queued: {job.name}"


def validate(det: Any, zp, fd):
    import gradio as gr

    try:
        report = det.check_dataset(_source(det, zp, fd))
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return report.markdown(), sum(s.images for s in report.splits.values())


def suggest_fn(det: Any, n, base_id):
    s = det.suggest_training(int(n or 0), base_id)
    return s["epochs"], s["imgsz"], s["batch"], s["reason"]


def start(det: Any, zp, fd, *vals):
    keys = ("base", "epochs", "imgsz", "batch", "patience", "seed", "augment", "amp")
    return _start(det, _source(det, zp, fd), dict(zip(keys, vals, strict=True)))


def poll(ctx: StudioContext, det: Any, jid):
    import gradio as gr

    job = ctx.jobs.get(jid) if jid else None
    if job is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    loss, maps = _plots(ctx, det, jid)
    return job_status(job), loss, maps, newest_first(job.logs)


def use_sample(det: Any):
    """One click: the synthetic shapes dataset, validated, with settings that train in minutes on a CPU."""
    root = det.make_sample_dataset()
    report = det.check_dataset(root)
    note = (
        "\n\nSample: circles, squares and triangles with exact labels, set up to train an untrained YOLOv8n for 30 "
        "epochs at 160 px (a few minutes on a CPU). Press **Train**."
    )
    n = sum(s.images for s in report.splits.values())
    return None, str(root), report.markdown() + note, n, "yolov8n-untrained", 30, 160, 8


def _build_dataset() -> dict[str, Any]:
    import gradio as gr

    gr.Markdown(
        "Dataset in YOLO format: `data.yaml` (train, val, names) with `images/<split>/*.jpg` and "
        "`labels/<split>/*.txt` (`class x_center y_center width height`, 0-1). An empty label file marks a "
        "background image. Starting from the shipped YOLOv8s reuses its features (fast); untrained models learn "
        "from scratch (needs hundreds of epochs)."
    )
    with gr.Row():
        zip_file = gr.File(file_types=[".zip"], type="filepath", label="Dataset .zip")
        folder = gr.Textbox(label="…or a dataset folder on the studio's computer (under data/ingest or ingest_roots)")
    with gr.Row():
        check = gr.Button("Validate dataset")
        sample = gr.Button("Use a sample dataset (synthetic shapes, 60 images)")
    report_md = gr.Markdown()
    return locals()


def _build_options(det: Any) -> dict[str, Any]:
    import gradio as gr

    bases = [(m.title, m.id) for m in det.models() if m.kind in ("shipped", "untrained", "hub")]
    with gr.Row():
        base = gr.Dropdown(bases, value="yolov8s-person", label="Start from")
        epochs = gr.Number(50, label="Epochs", precision=0, minimum=1)
        imgsz = gr.Number(640, label="Image size", precision=0, minimum=32, step=32)
        batch = gr.Number(16, label="Batch", precision=0, minimum=1)
        suggest = gr.Button("Suggest from VRAM budget", size="sm")
    with gr.Row():
        patience = gr.Number(20, label="Early stopping patience (epochs)", precision=0, minimum=0)
        seed = gr.Number(0, label="Seed", precision=0)
        augment = gr.Checkbox(True, label="Augmentation (mosaic, flips, colour, scale)")
        amp = gr.Checkbox(True, label="Mixed precision (GPU only)")
    suggestion = gr.Markdown()
    with gr.Row():
        train = gr.Button("Train", variant="primary")
        stop = gr.Button("Stop (keeps last.pt)")
    return locals()


def _build_progress() -> dict[str, Any]:
    import gradio as gr

    status = gr.Markdown("No training yet.")
    with gr.Row():
        loss_plot = gr.LinePlot(None, x="epoch", y="value", color="series", title="Training loss", height=240)
        map_plot = gr.LinePlot(None, x="epoch", y="value", color="series", title="Validation mAP", height=240)
    logs = gr.Textbox(label="Log (newest first)", lines=6, max_lines=6)
    return locals()


def build_train(ctx: StudioContext, det: Any, model: Any) -> None:
    import gradio as gr

    d, o, p = _build_dataset(), _build_options(det), _build_progress()
    n_images, job_id = gr.State(0), gr.State(None)
    source = [d["zip_file"], d["folder"]]
    d["check"].click(bind(validate, det), source, [d["report_md"], n_images], api_name="vision_validate")
    d["sample"].click(bind(use_sample, det), None, [*source, d["report_md"], n_images, o["base"], o["epochs"],
                                                    o["imgsz"], o["batch"]])  # fmt: skip
    o["suggest"].click(bind(suggest_fn, det), [n_images, o["base"]],
                       [o["epochs"], o["imgsz"], o["batch"], o["suggestion"]])  # fmt: skip
    keys = ("base", "epochs", "imgsz", "batch", "patience", "seed", "augment", "amp")
    o["train"].click(bind(start, det), [*source, *(o[k] for k in keys)], [job_id, p["status"]],
                     api_name="vision_train")  # fmt: skip
    o["stop"].click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    gr.Timer(2.0).tick(bind(poll, ctx, det), job_id, [p["status"], p["loss_plot"], p["map_plot"], p["logs"]],
                       show_progress="hidden")  # fmt: skip


def build_export(ctx: StudioContext, det: Any, model: Any) -> None:
    import gradio as gr

    from backends.vision import tensorrt_available

    trt = (
        "TensorRT is installed, but engine export is not wired into the studio yet: ONNX only."
        if tensorrt_available()
        else "TensorRT is not installed: ONNX only."
    )
    gr.Markdown(
        "Export the chosen model to ONNX (fp32, batch 1) and time it: PyTorch (on the studio's device) against "
        f"ONNX Runtime (CPU), model forward only, same letterboxed image. {trt}"
    )
    with gr.Row():
        size = gr.Dropdown([320, 480, 640, 960], value=640, label="Image size")
        runs = gr.Slider(5, 200, value=30, step=5, label="Timed runs")
        export = gr.Button("Export ONNX and time it", variant="primary")
    onnx_file = gr.File(label="ONNX model", interactive=False)
    table = gr.Dataframe(headers=["engine", "device", "p50 ms", "p95 ms", "mean ms", "FPS", "runs"], interactive=False)

    def run(model_id, s, n):
        try:
            path = det.export_onnx(model_id, int(s), for_download=True)
            rows = det.latency(model_id, imgsz=int(s), runs=int(n))
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from None
        return str(path), [[r.engine, r.device, r.p50_ms, r.p95_ms, r.mean_ms, r.fps, r.runs] for r in rows]

    export.click(
        run,
        [model, size, runs],
        [onnx_file, table],
        api_name="vision_export",
        **ctx.queues.event_kwargs("Vision"),
    )
