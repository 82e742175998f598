"""Tiny LM lab tab: train a small GPT from scratch (learned / rotary / ALiBi positions, characters or BPE, Shakespeare
or Python source), watch loss, perplexity, tokens/s and the learning rate live, sample with or without the KV cache,
measure perplexity past the training context, and compare runs on one chart from their Runs records."""

from __future__ import annotations

from typing import Any

from studio.context import StudioContext, Tab
from tabs._session import bind, job_status, newest_first, on_page_load, started_note

SIZES = {  # label -> preset name in backends.tinylm.PRESETS
    "tiny (0.1 M params, CPU-friendly)": "tiny",
    "small (0.8 M params)": "small",
    "nanoGPT preset (10.7 M params, 256 context, dropout 0.2; GPU)": "nanogpt",
}
CORPUS_CHOICES = {
    "Shakespeare: the texts chosen below": "shakespeare",
    "TinyShakespeare (nanoGPT's plays, rebuilt offline)": "tinyshakespeare",
    "Python source (the standard library on this machine)": "python",
    "Your text file (upload below)": "text",
}
TEXT_CHOICE = next(k for k, v in CORPUS_CHOICES.items() if v == "text")
TOKENIZER_CHOICES = {"characters": "char", "BPE (trained on the corpus with `tokenizers`)": "bpe"}
POSITION_CHOICES = {"learned table (GPT-2)": "learned", "rotary (RoPE)": "rope", "ALiBi (linear biases)": "alibi"}
COMPARE_METRICS = {"validation loss": "val_loss", "perplexity": "val_ppl", "train loss": "train_loss",
                   "tokens/s": "tokens_per_s", "learning rate": "lr"}  # fmt: skip
PLOT_COLUMNS = ["step", "value", "series"]
LOSS_COLORS = {"train": "#4c78a8", "validation": "#f58518"}  # a plot keeps the series of its first update otherwise


def series_frame(rows: list[dict[str, Any]], keys: dict[str, str]):
    """Long format (step, value, series) for gr.LinePlot, numeric columns only; `keys` maps metric -> series."""
    import pandas as pd

    long = [
        {"step": float(m["step"]), "value": float(m[key]), "series": name}
        for m in rows
        for key, name in keys.items()
        if isinstance(m.get(key), int | float) and not isinstance(m.get(key), bool)
    ]
    frame = pd.DataFrame(long, columns=PLOT_COLUMNS)
    return frame.astype({"step": "float64", "value": "float64", "series": "str"})


def live_frames(metrics: list[dict[str, Any]]) -> list[Any]:
    """The four live plots: loss (train, validation), perplexity, tokens/s, learning rate; None when empty."""
    specs = ({"train_loss": "train", "val_loss": "validation"}, {"val_ppl": "validation perplexity"},
             {"tokens_per_s": "training tokens/s"}, {"lr": "learning rate"})  # fmt: skip
    frames = [series_frame(metrics, keys) for keys in specs]
    return [None if f.empty else f for f in frames]


def training_options(corpus_v, works_v, tok_v, bpe_v, steps_v, batch_v, lr_v, seed_v, compile_v, text_id=""):
    from backends.tinylm import DataSpec, TrainOptions

    corpus = CORPUS_CHOICES.get(corpus_v, corpus_v)
    data = DataSpec(corpus=corpus, works=tuple(works_v or ()), tokenizer=TOKENIZER_CHOICES.get(tok_v, tok_v),
                    bpe_vocab=int(bpe_v), text_id=(text_id or "") if corpus == "text" else "")  # fmt: skip
    steps = int(steps_v)
    return TrainOptions(works=data.works, steps=steps, batch_size=int(batch_v), lr=float(lr_v), seed=int(seed_v),
                        eval_every=max(1, steps // 20), warmup_steps=min(100, steps // 10), compile=bool(compile_v),
                        data=data)  # fmt: skip


def start(backend: Any, pos_v, size_v, corpus_v, works_v, tok_v, bpe_v, steps_v, batch_v, lr_v, seed_v, compile_v,
          text_id=""):  # fmt: skip
    import gradio as gr

    from backends.tinylm import PRESETS

    try:
        opts = training_options(corpus_v, works_v, tok_v, bpe_v, steps_v, batch_v, lr_v, seed_v, compile_v, text_id)
        model = dict(PRESETS[SIZES.get(size_v, size_v)]) | {"pos": POSITION_CHOICES.get(pos_v, pos_v)}
        job = backend.start_training(model, opts)
    except (ValueError, FileNotFoundError, KeyError, TypeError) as e:
        raise gr.Error(str(e).strip("'\"")) from None
    return job.id, started_note(job)  # a double click gets the run under way: followed, not started twice


def add_text(backend: Any, upload):
    """An uploaded text file becomes the corpus: (its id for the Train button, a summary, the corpus choice)."""
    import gradio as gr

    if not upload:
        return "", "No text file yet.", gr.skip()
    try:
        text_id, summary = backend.add_text(upload)
    except (ValueError, OSError) as e:
        raise gr.Error(str(e)) from None
    return text_id, f"Corpus: {summary}", TEXT_CHOICE


def poll(ctx: StudioContext, backend: Any, jid, seen):
    """(status, 4 plots, logs, sample list, seen) every 2 s; the sample list refreshes when a run finishes."""
    import gradio as gr

    job = ctx.jobs.get(jid) if jid else None
    if job is None:
        return (gr.skip(),) * 7 + (seen,)
    result_run = getattr(job.result, "run_id", None)
    runs = [r for r in ctx.runs.list() if r.kind == "tinylm"]
    run = next((r for r in runs if r.id == result_run), runs[0] if runs else None)
    frames = live_frames(run.metrics() if run else [])
    models = gr.skip()
    if job.is_finished and seen != job.id:
        trained = backend.trained_models()
        models, seen = gr.update(choices=trained, value=trained[0] if trained else None), job.id
    return job_status(job), *frames, newest_first(job.logs), models, seen


def _checked(run_id) -> str:
    import gradio as gr

    if not run_id:
        raise gr.Error("Choose a trained model first (train one above; it appears here when it finishes).")
    return run_id


def write(backend: Any, run_id, prompt_v, n, temp, use_cache):
    import gradio as gr

    try:
        out = backend.sample_timed(_checked(run_id), prompt_v, int(n), float(temp), use_cache=bool(use_cache))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    how = "with the KV cache" if out.cached else "without the cache (the whole window every token)"
    return out.text, f"{out.new_tokens} tokens in {out.seconds:.2f} s: **{out.tokens_per_s:,.0f} tokens/s** {how}"


def cache_speed(backend: Any, run_id, prompt_v, n):
    import gradio as gr

    try:
        cached, plain = backend.cache_speed(_checked(run_id), prompt_v, int(n))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    same = ("the same text" if cached.text == plain.text else "the texts part once the window is full (the cache "
            "then restarts from the last half window, the uncached path rereads the whole window)")  # fmt: skip
    return (f"{cached.new_tokens} tokens, same seed: with the cache **{cached.tokens_per_s:,.0f} tokens/s**, "
            f"without **{plain.tokens_per_s:,.0f} tokens/s** ({cached.tokens_per_s / plain.tokens_per_s:.1f}x); "
            f"{same}.")  # fmt: skip


def extrapolate(backend: Any, run_id):
    import gradio as gr

    try:
        points = backend.extrapolation(_checked(run_id))
    except (ValueError, FileNotFoundError) as e:
        raise gr.Error(str(e)) from None
    rows = [[f"{p.factor}x", p.context, "n/a: a learned table ends at 1x" if p.loss is None else f"{p.perplexity:.3f}",
             p.tokens] for p in points]  # fmt: skip
    return rows


def compare(ctx: StudioContext, backend: Any, run_ids, metric_v):
    """One chart of `metric` for the chosen runs (from their Runs records) and their extrapolation curves."""
    import pandas as pd

    key = COMPARE_METRICS.get(metric_v, "val_loss")
    labels = {rid: label for label, rid in backend.runs()}
    frames, curves = [], []
    for rid in run_ids or []:
        if rid not in labels:
            continue
        frames.append(series_frame(ctx.runs.get(rid).metrics(), {key: labels[rid]}))
        curves += [{"factor": float(p["factor"]), "value": float(p["perplexity"]), "series": labels[rid]}
                   for p in backend.saved_extrapolation(rid) if p.get("perplexity") is not None]  # fmt: skip
    metric = pd.concat(frames) if frames else None
    extra = pd.DataFrame(curves, columns=["factor", "value", "series"]) if curves else None
    return (None if metric is None or metric.empty else metric), extra


def _run_choices(backend: Any, current):
    import gradio as gr

    choices = backend.runs()
    keep = [c for c in (current or []) if c in {rid for _, rid in choices}]
    return gr.update(choices=choices, value=keep or [rid for _, rid in choices[:3]])


def _trained_update(backend: Any, current):
    import gradio as gr

    trained = backend.trained_models()
    return gr.update(choices=trained, value=current if current in trained else (trained[0] if trained else None))


def _build_train() -> dict[str, Any]:
    import gradio as gr

    from backends.tinylm import available_works

    with gr.Row():
        with gr.Column():
            pos = gr.Radio(list(POSITION_CHOICES), value=next(iter(POSITION_CHOICES)), label="Position encoding")
            size = gr.Radio(list(SIZES), value=next(iter(SIZES)), label="Model size")
            corpus = gr.Radio(list(CORPUS_CHOICES), value=next(iter(CORPUS_CHOICES)), label="Corpus")
            works = gr.Dropdown(available_works(), value=["hamlet", "macbeth"], multiselect=True, label="Texts")
            with gr.Accordion("Your own text file (nanoGPT's input.txt, notes, code...)", open=False):
                text_file = gr.File(label="Text file (UTF-8, or UTF-16 with a BOM; 10,000 characters to 64 MiB)",
                                    file_types=[".txt", ".md", ".py", ".csv", ".json", ".jsonl", ".log"],
                                    type="filepath")  # fmt: skip
                text_note = gr.Markdown("No text file yet.")
            with gr.Row():
                tok = gr.Radio(list(TOKENIZER_CHOICES), value="characters", label="Tokens")
                bpe = gr.Number(512, label="BPE vocabulary", precision=0, minimum=260, maximum=32768)
            with gr.Row():
                steps = gr.Number(1000, label="Steps", precision=0, minimum=1)
                batch = gr.Number(32, label="Batch size", precision=0, minimum=1)
                lr = gr.Number(1e-3, label="Learning rate")
                seed = gr.Number(1337, label="Seed", precision=0)
            use_compile = gr.Checkbox(False, label="torch.compile (GPU; the first steps take tens of seconds)")
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary")
                cancel_btn = gr.Button("Stop (keeps the last checkpoint)")
        with gr.Column():
            status = gr.Markdown("No training yet.")
            with gr.Row():
                loss_plot = gr.LinePlot(
                    None, x="step", y="value", color="series", title="Loss", height=220, color_map=LOSS_COLORS
                )  # fixed: validation appears after the first points
                ppl_plot = gr.LinePlot(None, x="step", y="value", color="series", title="Perplexity", height=220)
            with gr.Row():
                speed_plot = gr.LinePlot(None, x="step", y="value", color="series", title="Tokens/s", height=200)
                lr_plot = gr.LinePlot(None, x="step", y="value", color="series", title="Learning rate", height=200)
            logs = gr.Textbox(label="Log (newest first)", lines=6, max_lines=6)
    return locals()


def _build_sample(backend: Any) -> dict[str, Any]:
    import gradio as gr

    gr.Markdown("### Sample")
    trained = backend.trained_models()
    model = gr.Dropdown(trained, value=trained[0] if trained else None, label="Trained model (run id, newest first)")
    with gr.Row():
        prompt = gr.Textbox("ROMEO:\n", label="Start text", lines=2)
        max_new = gr.Slider(10, 2000, value=300, step=10, label="Tokens to write")
        temperature = gr.Slider(0.1, 2.0, value=0.8, step=0.05, label="Temperature")
        use_cache = gr.Checkbox(True, label="Use the KV cache")
    with gr.Row():
        sample_btn = gr.Button("Write")
        speed_btn = gr.Button("Speed: with vs without the cache")
        extra_btn = gr.Button("Perplexity at 1x / 2x / 4x the training context")
    speed = gr.Markdown()
    sample_out = gr.Textbox(label="Output", lines=10)
    extra_table = gr.Dataframe(headers=["context", "length (tokens)", "held-out perplexity", "tokens scored"],
                               label="Length extrapolation (saved with the run; see the comparison below)")  # fmt: skip
    return locals()


def _build_compare() -> dict[str, Any]:
    import gradio as gr

    gr.Markdown("### Runs side by side (from the Runs records)")
    with gr.Row():
        runs = gr.Dropdown([], multiselect=True, label="Runs to compare")
        metric = gr.Dropdown(list(COMPARE_METRICS), value="validation loss", label="Metric")
        show = gr.Button("Compare")
    with gr.Row():
        chart = gr.LinePlot(None, x="step", y="value", color="series", title="Runs", height=280)
        curves = gr.LinePlot(None, x="factor", y="value", color="series", title="Perplexity vs context (x training)",
                             height=280)  # fmt: skip
    return locals()


def build(ctx: StudioContext) -> None:
    import gradio as gr

    backend = ctx.backends.tinylm
    gr.Markdown(
        "## Tiny LM lab\nTrain a small GPT (nanoGPT-style) **from scratch** on Shakespeare or Python source (shipped "
        "offline) or a text file of yours, with a learned, rotary or ALiBi position encoding. Loss starts near "
        "ln(vocabulary) and falls as it learns spelling, then words, then verse. Every run is recorded in the Runs "
        "tab and can be compared below."
    )
    job_id, seen, text_id = gr.State(None), gr.State(None), gr.State("")
    t, s, c = _build_train(), _build_sample(backend), _build_compare()
    model, gpu = s["model"], ctx.queues.event_kwargs("Tiny LM lab")
    inputs = [t[k] for k in ("pos", "size", "corpus", "works", "tok", "bpe", "steps", "batch", "lr", "seed",
                             "use_compile")] + [text_id]  # fmt: skip
    t["text_file"].upload(bind(add_text, backend), t["text_file"], [text_id, t["text_note"], t["corpus"]])
    t["train_btn"].click(bind(start, backend), inputs, [job_id, t["status"]])
    t["cancel_btn"].click(lambda jid: ctx.jobs.cancel(jid) if jid else None, job_id, None)
    plots = [t["loss_plot"], t["ppl_plot"], t["speed_plot"], t["lr_plot"]]
    gr.Timer(2.0).tick(bind(poll, ctx, backend), [job_id, seen], [t["status"], *plots, t["logs"], model, seen],
                       show_progress="hidden")  # fmt: skip
    refresh = bind(_trained_update, backend)
    on_page_load(refresh, model, model, queue=False)
    on_page_load(bind(_run_choices, backend), c["runs"], c["runs"], queue=False)
    model.focus(refresh, model, model, queue=False)
    c["runs"].focus(bind(_run_choices, backend), c["runs"], c["runs"], queue=False)
    s["sample_btn"].click(bind(write, backend), [model, s["prompt"], s["max_new"], s["temperature"], s["use_cache"]],
                          [s["sample_out"], s["speed"]], **gpu)  # fmt: skip
    s["speed_btn"].click(bind(cache_speed, backend), [model, s["prompt"], s["max_new"]], s["speed"], **gpu)
    s["extra_btn"].click(bind(extrapolate, backend), model, s["extra_table"], **gpu)
    c["show"].click(bind(compare, ctx, backend), [c["runs"], c["metric"]], [c["chart"], c["curves"]])


TAB = Tab("Tiny LM lab", build)
