"""Vision tab, Export section: export the chosen model (ONNX; TensorRT and OpenVINO where installed) and compare
the latency of every engine at batch 1 and 8 on the same images, each checked against PyTorch's outputs.

UI only (no torch): everything goes through `ctx.backends.detection`.
"""

from __future__ import annotations

from typing import Any

from studio.context import StudioContext

USER_ERRORS: tuple[type[Exception], ...] = (ValueError, FileNotFoundError, KeyError)


def export_and_time(det: Any, model_id: str, fmt: str, size: Any, runs: Any, batches: list[str], half: bool):
    import gradio as gr

    from backends.vision import LATENCY_HEADERS

    if not batches:
        raise gr.Error("Tick at least one batch size (1 or 8).")
    try:
        path = det.export(model_id, fmt, int(size), for_download=True)
        rows, notes = det.latency(model_id, imgsz=int(size), runs=int(runs), batches=tuple(sorted(int(b) for b in
                                  batches)), half=bool(half), cpu_runs=max(3, int(runs) // 5))  # fmt: skip
    except USER_ERRORS as e:
        raise gr.Error(str(e)) from None
    table = {"headers": LATENCY_HEADERS, "data": [r.cells() for r in rows]}
    text = " ".join(notes) or "Every engine installed here is in the table."
    return str(path), table, text


def build_export(ctx: StudioContext, det: Any, model: Any) -> None:
    import gradio as gr

    from backends.vision import LATENCY_HEADERS

    formats = det.export_formats()
    missing = [f"**{title}**: {why}" for title, _, why in formats if why]
    gr.Markdown(
        "Export the chosen detection model (static shape, batch 1) and time it: PyTorch on the studio's device "
        "(fp32, and fp16 on a GPU) against ONNX Runtime, TensorRT and OpenVINO where they are installed, model "
        "forward only, on the same letterboxed images, at batch 1 and 8. Each engine's raw outputs are compared "
        "with PyTorch fp32's (largest class-score and box differences)."
        + ("\n\nNot available here: " + "; ".join(missing) + "." if missing else "")
    )
    with gr.Row():
        fmt = gr.Dropdown([(t, f) for t, f, why in formats if why is None], value="onnx", label="Download format")
        size = gr.Dropdown([320, 480, 640, 960], value=640, label="Image size")
        runs = gr.Slider(5, 200, value=30, step=5, label="Timed runs (CPU engines: a fifth)")
        batches = gr.CheckboxGroup(["1", "8"], value=["1", "8"], label="Batch sizes")
        half = gr.Checkbox(True, label="fp16 rows (GPU)")
    export = gr.Button("Export and compare latency", variant="primary")
    out_file = gr.File(label="Exported model", interactive=False)
    table = gr.Dataframe(headers=LATENCY_HEADERS, interactive=False)
    notes = gr.Markdown()
    export.click(
        lambda *a: export_and_time(det, *a),
        [model, fmt, size, runs, batches, half],
        [out_file, table, notes],
        api_name="vision_export",
        **ctx.queues.event_kwargs("Vision"),
    )
