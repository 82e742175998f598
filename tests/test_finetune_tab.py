"""Fine-tune tab: builds without loading a model, numeric plots, the dataset check, a second Start refused while a
run is going, bad options refused with a message naming the value."""

from __future__ import annotations

import gradio as gr
import pytest

from tabs import finetune
from tests import _llm_support

llm_ctx, llm = _llm_support.llm_ctx, _llm_support.llm  # session fixtures (the converted SmolLM2)


def handlers(demo) -> dict:
    return {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}


@pytest.fixture(scope="module")
def tab(llm_ctx, llm):
    with gr.Blocks() as demo:
        finetune.TAB.build(llm_ctx)
    return demo, handlers(demo)


def test_tab_builds_and_lists_the_offline_model(ctx):
    with gr.Blocks() as demo:
        finetune.TAB.build(ctx)
    labels = {getattr(b, "label", None) for b in demo.blocks.values()}
    assert {"Dataset file", "Base model", "Training loss", "Learning rate", "Adapter name"} <= labels
    model = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Base model")
    assert model.value == "smollm2-135m"
    assert not ctx.residency.is_registered("chat:smollm2-135m")  # building the UI loads nothing


def test_plots_get_numeric_columns():
    loss, lr = finetune._plot_frames([{"step": 1, "loss": 2.5, "lr": 1e-4}, {"step": 2, "loss": 2.0, "lr": 2e-4}])
    assert str(loss["loss"].dtype) == "float64" and str(lr["learning rate"].dtype) == "float64"
    empty, _ = finetune._plot_frames([])
    assert list(empty.columns) == ["step", "loss"] and len(empty) == 0


def options(**over):
    base = dict(model="smollm2-135m", fmt="auto", max_len=128, overlong="cut", loss_on="assistant", packing=False,
                skip=False, frac=0.1, rank=8, alpha=16, dropout=0.0, targets=["q_proj", "v_proj"], rslora=False,
                dora=False, steps=3, batch=2, accum=1, lr=2e-4, schedule="cosine", warmup=1, optimizer="adamw_8bit",
                seed=0, save_every=0, offload="auto", name="tab-adapter")  # fmt: skip
    base.update(over)
    return list(base.values())


def test_sample_task_check_shows_summary_preview_and_estimate(tab):
    _, fns = tab
    path, note = fns["use_sample"]()
    assert path.endswith("shakespeare-qa.jsonl") and "400 questions" in note
    text, preview = fns["check"](path, "", *options())
    assert "400 of 400 records usable" in text and "Will it fit" in text and "GB" in text
    assert preview["visible"] and len(preview["value"]) == 5


def test_bad_values_and_a_second_start_are_refused(tab, llm_ctx):
    _, fns = tab
    path, _ = fns["use_sample"]()
    with pytest.raises(gr.Error, match="rank 0"):
        fns["check"](path, "", *options(rank=0))
    with pytest.raises(gr.Error, match="dataset file first"):
        fns["start"](None, "", "", *options())

    def hold(job):
        while not job.should_stop():
            job.wait(0.02)

    running = llm_ctx.jobs.submit("other session's fine-tune", hold, gpu=False)
    try:
        with pytest.raises(gr.Error, match="already running"):
            fns["start"](running.id, path, "", *options())
    finally:
        llm_ctx.jobs.cancel(running.id)
        running.wait(5)
    assert fns["cancel"](None) == "Nothing to cancel."
