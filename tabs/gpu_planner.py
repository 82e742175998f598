"""The VRAM planner section of the GPU tab: will this job fit on this card, what each part costs, and what to change.

Pick a catalog model (its local files are read when present: config.json, safetensors headers, a GGUF header;
otherwise its built-in architecture) or a folder under the models folder, and a task with its numbers; the planner
(`studio.planner`, through the residency manager's `vram`) answers with weights, KV cache, activations, optimizer and
overhead against the card's live budget, a verdict and the seed's advice ranked by what each saves. Below it, the
footprints the residency manager measured beside what the planner predicted for them, and the correction each model
family now carries. UI only: pure functions build every output (tested without a browser); no state is kept.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from studio.context import StudioContext
from studio.planner import (
    PRESETS,
    Chat,
    DetectTrain,
    Estimate,
    ImageGen,
    ImageLora,
    LoraTrain,
    ModelInfo,
    ModelInfoError,
    Transcribe,
    preset,
    read_model,
)
from studio.units import fmt_bytes

TASKS = [("Chat", "chat"), ("LoRA / QLoRA training", "lora"), ("Image generation", "image"),
         ("Image LoRA training", "image_lora"), ("YOLO training", "yolo_train"), ("Transcription", "transcribe")]  # fmt: skip
FAMILY_TASKS = {"llm": ("chat", "lora"), "sd15": ("image", "image_lora"), "sdxl": ("image", "image_lora"),
                "yolo": ("yolo_train",), "whisper": ("transcribe",)}  # fmt: skip
PRECISIONS = ("nf4", "int4", "16bit", "fp32")
ADVICE_HEADERS = ["change", "needs", "saves", "fits"]
PART_HEADERS = ["part", "bytes"]
MEASURED_HEADERS = ["family", "job", "model key", "weights predicted", "weights measured", "working predicted",
                    "working measured", "working error", "family correction now"]  # fmt: skip
EXTRA_PRESETS = ("llama-2-13b",)  # architectures worth planning that the catalog does not list


def model_choices(ctx: StudioContext) -> list[tuple[str, str]]:
    """(label, value) for every catalog model the planner can size, plus extra architectures."""
    out = []
    for cap in ("chat", "asr", "detection", "diffusion"):
        for spec in ctx.catalog.by_capability(cap):
            if preset(spec.id) is not None or ctx.catalog.is_present(spec):
                out.append((spec.title, spec.key))
    out += [(f"{PRESETS[k].name} architecture", f"preset:{k}") for k in EXTRA_PRESETS]
    return out


def resolve_model(ctx: StudioContext, choice: str | None, folder: str) -> ModelInfo:
    """The model to size: a folder under the models folder when given, else the chosen catalog entry."""
    from studio.safety import contained_path

    if folder and folder.strip():
        try:
            return read_model(contained_path(ctx.settings.models_dir, folder.strip()))
        except (ModelInfoError, ValueError, OSError) as e:
            raise gr.Error(
                f"Folder {folder.strip()!r}: {e}. Give a folder name inside {ctx.settings.models_dir}."
            ) from None
    if not choice:
        raise gr.Error("Pick a model (or type a folder name under the models folder).")
    if choice.startswith("preset:"):
        found = PRESETS.get(choice.removeprefix("preset:"))
        if found is None:
            raise gr.Error(f"Unknown architecture {choice!r}; pick one from the list.")
        return found
    try:
        spec = ctx.catalog.get(choice)
    except KeyError:
        raise gr.Error(f"{choice!r} is not in the catalog; pick a model from the list.") from None
    path = ctx.catalog.local_path(spec) if ctx.catalog.is_present(spec) else None
    if path is not None:
        try:
            return read_model(path)
        except (ModelInfoError, ValueError, OSError):
            pass  # the built-in architecture below is the fallback
    found = preset(spec.id)
    if found is None:
        raise gr.Error(f"The planner has no architecture for {spec.title} and its files are not on this machine.")
    return found


def make_task(kind: str, length: float, batch: float, rank: float, precision: str, size: float) -> Any:
    """The task dataclass from the form's numbers; bad values become a short gr.Error naming the fix."""
    length, batch, rank, size = int(length or 0), int(batch or 0), int(rank or 0), int(size or 0)
    try:
        if kind == "chat":
            return Chat(context=length, batch=batch, precision=precision)
        if kind == "lora":
            return LoraTrain(
                seq=length, micro_batch=batch, rank=rank, quant="16bit" if precision in ("16bit", "fp32") else "nf4"
            )
        if kind == "image":
            return ImageGen(size, size, batch)
        if kind == "image_lora":
            return ImageLora(size, batch, rank)
        if kind == "yolo_train":
            return DetectTrain(size, batch)
        if kind == "transcribe":
            return Transcribe(batch=batch)
    except ValueError as e:
        raise gr.Error(f"{e}.") from None
    raise gr.Error(f"Unknown task {kind!r}; pick one of the listed tasks.")


def live_budget(ctx: StudioContext, override_gb: float | None) -> int | None:
    """The budget to judge against: the override (GB) when set, else the residency manager's live capacity."""
    if override_gb:
        if override_gb < 0:
            raise gr.Error(f"Budget {override_gb} GB: use a positive number, or 0 for this card's live budget.")
        return int(override_gb * 2**30)
    if not str(ctx.residency.device).startswith("cuda"):
        return None
    return ctx.residency.capacity_bytes()


def estimate_outputs(est: Estimate) -> tuple[str, list[list[str]], list[list[str]]]:
    """(summary markdown, part rows, advice rows) of one estimate."""
    lines = [f"### {est.verdict.capitalize() if est.budget is not None else 'Estimate'}", est.summary()]
    if est.budget is None:
        lines.append("No GPU budget here (no CUDA GPU): set a budget in GB to get a verdict for another card.")
    if est.correction:
        fw, fk, n = est.correction
        lines.append(f"Corrected by {n} measurement(s) of this family: weights x{fw:.2f}, working memory x{fk:.2f}.")
    best = est.best()
    if est.budget is not None and not est.fits and best is not None:
        lines.append(f"**Closest setting that fits:** {best.change} ({fmt_bytes(best.total)}).")
    if est.offload is not None:
        s = est.offload
        lines.append(f"**Larger than the card:** keep {s.resident} of {s.layers} layers on the GPU and stream "
                     f"{s.streamed} from pinned RAM ({fmt_bytes(s.gpu_bytes)} on the GPU; {fmt_bytes(s.streamed_bytes)} "
                     f"moved per token, about {s.seconds_per_token_moving * 1000:.0f} ms/token on PCIe 4.0).")  # fmt: skip
    parts = [[k.replace("_", " "), fmt_bytes(v)] for k, v in est.parts.items()] + [["total", fmt_bytes(est.total)]]
    fits = {True: "yes", False: "no", None: "-"}
    advice = [[a.change, fmt_bytes(a.total), fmt_bytes(a.saves), fits[a.fits]] for a in est.advice]
    return "\n\n".join(lines), parts, advice


def measured_rows(ctx: StudioContext, limit: int = 40) -> list[list[str]]:
    """Predicted vs measured footprints the residency manager recorded, newest first."""
    store = ctx.residency.vram.store
    rows = []
    for fp in reversed(store.entries()[-limit:]):
        err = f"{100 * (fp.working_ratio - 1):+.0f}%" if fp.working_ratio else "-"
        corr = store.correction(fp.family)
        now = f"weights x{corr[0]:.2f}, working x{corr[1]:.2f} ({corr[2]})" if corr else "-"
        rows.append([fp.family, fp.shape, fp.key, fmt_bytes(fp.predicted_weights), fmt_bytes(fp.measured_weights),
                     fmt_bytes(fp.predicted_working), fmt_bytes(fp.measured_working), err, now])  # fmt: skip
    return rows


def plan_job(ctx: StudioContext, choice: str | None, folder: str, kind: str, length: float, batch: float,
             rank: float, precision: str, size: float, budget_gb: float | None):  # fmt: skip
    model = resolve_model(ctx, choice, folder)
    if kind not in FAMILY_TASKS[model.family]:
        names = dict((v, k) for k, v in TASKS)
        allowed = ", ".join(names[t] for t in FAMILY_TASKS[model.family])
        raise gr.Error(f"{model.name} is a {model.family} model: its tasks are {allowed}.")
    est = ctx.residency.vram.plan(
        model, make_task(kind, length, batch, rank, precision, size), live_budget(ctx, budget_gb)
    )
    summary, parts, advice = estimate_outputs(est)
    return summary, parts, advice, measured_rows(ctx)


def build_planner(ctx: StudioContext) -> None:
    gr.Markdown("## VRAM planner\nWill it fit? Pick a model and a job: the planner adds up weights, KV cache, "
                "activations, optimizer and overhead, compares them with this card's live budget and ranks what "
                "would make it fit. It learns: measured footprints correct its formulas per model family.")  # fmt: skip
    choices = model_choices(ctx)
    with gr.Row():
        choice = gr.Dropdown(choices, value=choices[0][1] if choices else None, label="Model", scale=2)
        folder = gr.Textbox("", label="…or a folder under the models folder", placeholder="my-model", scale=2)
        kind = gr.Dropdown(TASKS, value="chat", label="Task", scale=1)
    with gr.Row():
        length = gr.Number(4096, label="Context / sequence (tokens)", precision=0)
        batch = gr.Number(1, label="Batch / micro-batch", precision=0)
        rank = gr.Number(16, label="LoRA rank", precision=0)
        precision = gr.Dropdown(list(PRECISIONS), value="nf4", label="LLM weights")
        size = gr.Number(1024, label="Image size (px)", precision=0)
        budget = gr.Number(0, label="Budget GB (0: this card, live)")
    go = gr.Button("Plan", variant="primary")
    summary = gr.Markdown("")
    with gr.Row():
        parts = gr.Dataframe(headers=PART_HEADERS, interactive=False, label="Parts", scale=1)
        advice = gr.Dataframe(headers=ADVICE_HEADERS, interactive=False, label="Advice, by what it saves", scale=2)
    measured = gr.Dataframe(measured_rows(ctx), headers=MEASURED_HEADERS, interactive=False,
                            label="Measured by the residency manager vs predicted")  # fmt: skip
    inputs = [choice, folder, kind, length, batch, rank, precision, size, budget]
    go.click(lambda *a: plan_job(ctx, *a), inputs, [summary, parts, advice, measured])
