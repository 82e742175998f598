"""Tiny LM tab handlers: live plot frames, runs side by side from Runs records, clear errors, a double click."""

from __future__ import annotations

import math
import threading

import gradio as gr
import pytest

from studio.safety import atomic_write_json
from tabs import tinylm as tab

ARGS = ("rotary (RoPE)", "tiny (0.1 M params, CPU-friendly)", "Shakespeare: the texts chosen below", ["sonnets"],
        "characters", 512, 100_000, 4, 1e-3, 7, False)  # fmt: skip


def _fake_run(ctx, pos: str, losses: list[float], extrapolation: list[float] | None = None):
    run = ctx.runs.create("tinylm", {"model": {"pos": pos, "n_layer": 2, "n_embd": 64}, "data": {"tokenizer": "char"}})
    for i, loss in enumerate(losses):
        run.log_metrics((i + 1) * 10, train_loss=loss + 0.1, val_loss=loss, val_ppl=math.exp(loss), lr=1e-3,
                        tokens_per_s=1000.0)  # fmt: skip
    if extrapolation:
        points = [{"factor": f, "perplexity": p} for f, p in zip((1, 2, 4), extrapolation, strict=True)]
        atomic_write_json(run.dir / "extrapolation.json", {"pos": pos, "points": points})
    run.finish("done")
    return run


def test_live_frames_are_numeric_and_empty_metrics_draw_nothing():
    rows = [{"step": 5, "train_loss": 3.0, "lr": 1e-4, "tokens_per_s": 900.0},
            {"step": 10, "train_loss": 2.5, "val_loss": 2.6, "val_ppl": 13.5, "lr": 2e-4, "tokens_per_s": 950.0}]  # fmt: skip
    loss, ppl, speed, lr = tab.live_frames(rows)
    assert list(loss["series"]) == ["train", "train", "validation"] and str(loss["value"].dtype) == "float64"
    assert list(ppl["value"]) == [13.5] and len(speed) == 2 and list(lr["step"]) == [5.0, 10.0]
    assert tab.live_frames([]) == [None, None, None, None]


def test_runs_side_by_side_from_the_run_records(ctx):
    rope = _fake_run(ctx, "rope", [3.0, 2.5, 2.2], [9.0, 14.0, 40.0])
    alibi = _fake_run(ctx, "alibi", [3.1, 2.6, 2.3], [9.5, 9.0, 8.8])
    backend = ctx.backends.tinylm
    chart, curves = tab.compare(ctx, backend, [rope.id, alibi.id, "../../etc"], "perplexity")
    assert chart["series"].nunique() == 2 and len(chart) == 6
    assert {s.split(" · ")[0] for s in chart["series"]} == {"rope", "alibi"}
    assert sorted(curves["factor"].unique()) == [1.0, 2.0, 4.0] and len(curves) == 6
    chart, curves = tab.compare(ctx, backend, [], "validation loss")
    assert chart is None and curves is None
    results = []  # two sessions at once
    threads = [threading.Thread(target=lambda: results.append(tab.compare(ctx, backend, [rope.id], "tokens/s")))
               for _ in range(2)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 2 and all(len(r[0]) == 3 for r in results)


def test_bad_settings_give_short_errors_and_a_double_click_makes_one_job(ctx):
    backend = ctx.backends.tinylm
    with pytest.raises(gr.Error, match="learning rate"):
        tab.start(backend, *ARGS[:8], 5.0, *ARGS[9:])
    with pytest.raises(gr.Error, match="Unknown or no works"):
        tab.start(backend, *ARGS[:3], ["no_such_play"], *ARGS[4:])
    with pytest.raises(gr.Error, match="BPE vocabulary"):
        tab.start(backend, *ARGS[:5], 10, *ARGS[6:])
    with pytest.raises(gr.Error, match="Choose a trained model"):
        tab.write(backend, None, "x", 10, 0.8, True)
    first, _ = tab.start(backend, *ARGS)
    again, status = tab.start(backend, *ARGS)  # the same settings while the first runs: the page follows it
    assert again == first and (
        "Queued **Tiny LM" in status or "Started **Tiny LM" in status or "following it" in status
    )
    assert [j.id for j in ctx.jobs.list() if j.name.startswith("Tiny LM")] == [first]
    ctx.jobs.cancel(first)
    assert ctx.jobs.get(first).wait(60)


def test_a_text_file_upload_becomes_the_corpus_and_train_needs_one(ctx, tmp_path):
    backend = ctx.backends.tinylm
    text_args = (*ARGS[:2], tab.TEXT_CHOICE, *ARGS[3:])
    with pytest.raises(gr.Error, match="Upload a text file first"):
        tab.start(backend, *text_args, "")
    assert tab.add_text(backend, None)[1] == "No text file yet."
    bad = tmp_path / "notes.txt"
    bad.write_bytes(b"\xff\xfe\x00")  # a UTF-16 BOM and half a character
    with pytest.raises(gr.Error, match=r"notes\.txt"):
        tab.add_text(backend, str(bad))
    good = tmp_path / "notes.md"
    good.write_text("the quick brown fox jumps over the lazy dog. " * 400, encoding="utf-8")
    text_id, note, corpus = tab.add_text(backend, str(good))
    assert corpus == tab.TEXT_CHOICE and text_id in note and "notes.md" in note
    jid, status = tab.start(backend, *text_args, text_id)
    assert "Tiny LM" in status and f"text {text_id[:8]}" in ctx.jobs.get(jid).name
    ctx.jobs.cancel(jid)
    assert ctx.jobs.get(jid).wait(60)
