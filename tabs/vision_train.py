"""Vision tab, Train section: import a labelling tool's export, check a dataset, train (detect, segment or classify)
with explained settings, live plots, stop and resume.

UI only (no torch). Training runs as a background job: closing the browser does not stop it; its run shows in
the Runs tab, and this section polls the job and the run's metrics every 2 s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.context import StudioContext
from tabs._session import bind, choices_update, job_status, newest_first, started_note
from tabs.vision_tasks import model_choices

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError)
METRICS = ("map50", "map50_95", "mask_map50", "mask_map50_95", "top1", "top5")
OPTION_KEYS = ("base", "epochs", "imgsz", "batch", "patience", "seed", "augment", "amp", "freeze")


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
    """(loss frame, metrics frame) with float columns, or None while empty (the plot keeps the axis types it first
    sees, and an empty object column makes the y-axis categorical)."""
    import pandas as pd

    run_id = det.job_runs.get(job_id) if job_id else None
    rows = ctx.runs.get(run_id).metrics() if run_id else []
    frames = []
    for pick in (lambda k: k.endswith("loss") and not k.startswith("val"), lambda k: k in METRICS):
        long = [{"epoch": float(r["step"]), "value": float(v), "series": k} for r in rows for k, v in r.items()
                if pick(k) and isinstance(v, int | float)]  # fmt: skip
        frame = pd.DataFrame(long, columns=["epoch", "value", "series"])
        frames.append(None if frame.empty else frame.astype({"epoch": "float64", "value": "float64"}))
    return frames[0], frames[1]


def _task(det: Any, base: str) -> str:
    try:
        return det.get_model(base).task
    except USER_ERRORS:
        return "detect"


def validate(det: Any, zp, fd, base="yolov8s-person"):
    import gradio as gr

    try:
        report = det.check_dataset(_source(det, zp, fd), _task(det, base))
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return report.markdown(), sum(s.images for s in report.splits.values())


def import_export(det: Any, zp, fd, fmt, name, val_share, mapping, keep_splits):
    """Import a labelling tool's export; on success the folder box points at the new dataset and the uploaded
    export is cleared (an upload wins over the folder: Validate and Train would otherwise read the export again)."""
    import gradio as gr

    from backends.vision import ImportOptions, parse_mapping

    if not (name or "").strip():
        raise gr.Error("Name the new dataset (it becomes a folder under data/ingest).")
    try:
        opts = ImportOptions(fmt=fmt, val_fraction=float(val_share), rename=parse_mapping(mapping),
                             keep_splits=bool(keep_splits))  # fmt: skip
        report = det.import_dataset(_source(det, zp, fd), name, opts)
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    n = sum(report.images.values())
    if not report.ok:
        return report.markdown(), gr.skip(), n, gr.skip()
    return report.markdown(), str(report.dest), n, None


def suggest_fn(det: Any, n, base_id, amp=False):
    s = det.suggest_training(int(n or 0), base_id, bool(amp))
    return s["epochs"], s["imgsz"], s["batch"], s["reason"]


def start(det: Any, zp, fd, *vals):
    import gradio as gr

    from backends.vision import TrainOptions

    v = dict(zip(OPTION_KEYS, vals, strict=True))
    try:
        opts = TrainOptions(base=v["base"], epochs=int(v["epochs"]), imgsz=int(v["imgsz"]), batch=int(v["batch"]),
                            patience=int(v["patience"]), seed=int(v["seed"]), augment=v["augment"],
                            amp=bool(v["amp"]), freeze=int(v["freeze"] or 0))  # fmt: skip
        job = det.start_training(_source(det, zp, fd), opts)
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return job.id, started_note(job)


def resume(det: Any, run_id: str | None):
    import gradio as gr

    if not run_id:
        raise gr.Error("Pick a stopped run to resume (press 'Refresh' to list them).")
    try:
        job = det.resume_training(run_id)
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    return job.id, started_note(job)


def poll(ctx: StudioContext, det: Any, jid, seen, current):
    """(status, 2 plots, logs, the Model list, seen) every 2 s; the Model list takes the new model once the run
    ends (the one picked stays picked)."""
    import gradio as gr

    job = ctx.jobs.get(jid) if jid else None
    if job is None:
        return (gr.skip(),) * 5 + (seen,)
    loss, maps = _plots(ctx, det, jid)
    models = gr.skip()
    if job.is_finished and seen != job.id:
        models, seen = choices_update(model_choices(det), current), job.id
    return job_status(job), loss, maps, newest_first(job.logs), models, seen


def use_sample(det: Any, base: str):
    """One click: a synthetic shapes dataset for the chosen task, validated, with settings that train in minutes
    on a CPU."""
    task = _task(det, base)
    root = det.make_sample_dataset(task=task)
    report = det.check_dataset(root, task)
    model, size = {"detect": ("yolov8n-untrained", 160), "segment": ("yolov8n-seg-untrained", 160),
                   "classify": ("yolov8n-cls-untrained", 64)}[task]  # fmt: skip
    note = (f"\n\nSample for **{task}**: circles, squares and triangles with exact labels, set up to train an "
            f"untrained model for 30 epochs at {size} px (a few minutes on a CPU). Press **Train**.")  # fmt: skip
    n = sum(s.images for s in report.splits.values())
    return None, str(root), report.markdown() + note, n, model, 30, size, 8


def _build_import() -> dict[str, Any]:
    import gradio as gr

    from backends.vision import IMPORT_FORMATS

    with gr.Accordion("Import from a labelling tool (Label Studio, CVAT, Roboflow)", open=False):
        gr.Markdown(
            "Export from the tool, then upload the .zip above (or give its folder): **COCO JSON** (Label Studio "
            "'COCO', CVAT 'COCO 1.0', Roboflow 'COCO'), **Pascal VOC XML** (CVAT, Label Studio, LabelImg) or "
            "Label Studio's **YOLO** export. Boxes are converted into a YOLO dataset under data/ingest; every "
            "problem is listed with its file and line, and nothing is written while there are any."
        )
        with gr.Row():
            fmt = gr.Dropdown([("detect automatically", "auto")] + [(v, k) for k, v in IMPORT_FORMATS.items()],
                              value="auto", label="Export format")  # fmt: skip
            name = gr.Textbox(label="New dataset name", placeholder="helmets-v1")
            val_share = gr.Slider(0.05, 0.5, value=0.2, step=0.05, label="Validation share",
                                  info="Images go to val by a hash of their path: stable when you add more.")  # fmt: skip
            keep = gr.Checkbox(True, label="Keep the export's own train/val split when it has one")
        mapping = gr.Textbox(
            label="Class mapping (optional)",
            lines=3,
            placeholder="Helmet = helmet\nhard hat = helmet\nperson =",
            info="One 'name in the export = name in the dataset' per line; two names onto one merges them, "
            "'name =' drops a class.",
        )
        run = gr.Button("Import")
    return {"fmt": fmt, "name": name, "val_share": val_share, "keep": keep, "mapping": mapping, "run": run}


def _build_dataset() -> dict[str, Any]:
    import gradio as gr

    gr.Markdown(
        "Dataset: YOLO format (`data.yaml` with train, val, names; `images/<split>/*.jpg` and `labels/<split>/*.txt`"
        ": `class x_center y_center width height` in 0-1, or polygon outlines for segmentation; an empty label file "
        "marks a background image). Classification: `train/<class>/*.jpg` and `val/<class>/*.jpg`."
    )
    with gr.Row():
        zip_file = gr.File(file_types=[".zip"], type="filepath", label="Dataset or export .zip")
        folder = gr.Textbox(label="…or a folder on the studio's computer (under data/ingest or ingest_roots)")
    with gr.Row():
        check = gr.Button("Validate dataset")
        sample = gr.Button("Use a sample dataset (synthetic shapes)")
    imp = _build_import()
    report_md = gr.Markdown()
    return {"zip_file": zip_file, "folder": folder, "check": check, "sample": sample, "report_md": report_md} | {
        f"import_{k}": v for k, v in imp.items()
    }


def _build_options(det: Any) -> dict[str, Any]:
    import gradio as gr

    from backends.vision import AUGMENT_PRESETS, HELP

    bases = [(f"[{m.task}] {m.title}", m.id) for m in det.models(None) if m.kind in ("shipped", "untrained", "hub")]
    with gr.Row():
        base = gr.Dropdown(bases, value="yolov8s-person", label="Start from (its task: detect, segment, classify)")
        epochs = gr.Number(50, label="Epochs", precision=0, minimum=1, info="Early stopping usually ends sooner.")
        imgsz = gr.Number(640, label="Image size", precision=0, minimum=32, step=32, info="Multiple of 32.")
        batch = gr.Number(16, label="Batch (0 = auto)", precision=0, minimum=0, info="0 fits the free GPU budget.")
        suggest = gr.Button("Suggest from VRAM budget", size="sm")
    with gr.Row():
        augment = gr.Dropdown(list(AUGMENT_PRESETS), value="default", label="Augmentation",
                              info="none / light / default (Ultralytics') / heavy")  # fmt: skip
        amp = gr.Checkbox(True, label="Mixed precision (GPU only)", info="~1.5-2x faster, less memory.")
        patience = gr.Number(20, label="Early stopping patience (epochs)", precision=0, minimum=0,
                             info="0 = never stop early.")  # fmt: skip
        freeze = gr.Number(0, label="Frozen layers", precision=0, minimum=0, maximum=30,
                           info="10 = YOLOv8's backbone: small datasets.")  # fmt: skip
        seed = gr.Number(0, label="Seed", precision=0)
    with gr.Accordion("What these settings do", open=False):
        gr.Markdown("\n".join(f"- {HELP[k]}" for k in ("augment", "amp", "patience", "imgsz", "batch", "freeze",
                                                         "epochs", "resume")))  # fmt: skip
    suggestion = gr.Markdown()
    with gr.Row():
        train = gr.Button("Train", variant="primary")
        stop = gr.Button("Stop (keeps last.pt, resumable)")
    with gr.Row():
        resumable = gr.Dropdown([], label="Resume a stopped or crashed run", scale=4)
        refresh = gr.Button("Refresh", size="sm", scale=1)
        resume_btn = gr.Button("Resume", scale=1)
    return locals()


def _build_progress() -> dict[str, Any]:
    import gradio as gr

    status = gr.Markdown("No training yet.")
    with gr.Row():
        loss_plot = gr.LinePlot(None, x="epoch", y="value", color="series", title="Training loss", height=240)
        map_plot = gr.LinePlot(None, x="epoch", y="value", color="series", title="Validation metrics", height=240)
    logs = gr.Textbox(label="Log (newest first)", lines=6, max_lines=6)
    return locals()


def build_train(ctx: StudioContext, det: Any, model: Any) -> None:
    import gradio as gr

    d, o, p = _build_dataset(), _build_options(det), _build_progress()
    n_images, job_id, seen = gr.State(0), gr.State(None), gr.State(None)
    source = [d["zip_file"], d["folder"]]
    d["check"].click(bind(validate, det), [*source, o["base"]], [d["report_md"], n_images], api_name="vision_validate")
    d["import_run"].click(bind(import_export, det), [*source, *(d[f"import_{k}"] for k in ("fmt", "name", "val_share",
                          "mapping", "keep"))], [d["report_md"], d["folder"], n_images, d["zip_file"]],
                          api_name="vision_import")  # fmt: skip
    d["sample"].click(bind(use_sample, det), o["base"], [*source, d["report_md"], n_images, o["base"], o["epochs"],
                                                         o["imgsz"], o["batch"]])  # fmt: skip
    o["suggest"].click(bind(suggest_fn, det), [n_images, o["base"], o["amp"]],
                       [o["epochs"], o["imgsz"], o["batch"], o["suggestion"]])  # fmt: skip
    o["train"].click(bind(start, det), [*source, *(o[k] for k in OPTION_KEYS)], [job_id, p["status"]],
                     api_name="vision_train")  # fmt: skip
    o["stop"].click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    o["refresh"].click(lambda: gr.update(choices=det.resumable_runs(), value=None), None, o["resumable"])
    o["resume_btn"].click(bind(resume, det), o["resumable"], [job_id, p["status"]], api_name="vision_resume")
    gr.Timer(2.0).tick(bind(poll, ctx, det), [job_id, seen, model],
                       [p["status"], p["loss_plot"], p["map_plot"], p["logs"], model, seen],
                       show_progress="hidden")  # fmt: skip
