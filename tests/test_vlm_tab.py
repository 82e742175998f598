"""VLM tab helpers (no browser): message checks, chatbot view, export, dataset path containment, model info."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tabs.vlm import dataset_path, export_conversation, model_info, to_chatbot, user_message


def test_user_message_refuses_empty_and_keeps_images():
    with pytest.raises(ValueError, match="empty"):
        user_message({"text": "   ", "files": ["/tmp/a.png"]})
    with pytest.raises(ValueError, match="null byte"):
        user_message({"text": "a\x00", "files": []})
    m = user_message({"text": " hi ", "files": ["/tmp/a.png", {"path": "/tmp/b.png"}]})
    assert m == {"role": "user", "content": "hi", "images": ["/tmp/a.png", "/tmp/b.png"]}


def test_chatbot_shows_each_image_then_the_text():
    shown = to_chatbot([{"role": "user", "content": "q", "images": ["a.png", "b.png"]},
                        {"role": "assistant", "content": "r"}])  # fmt: skip
    assert shown == [{"role": "user", "content": {"path": "a.png"}}, {"role": "user", "content": {"path": "b.png"}},
                     {"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]  # fmt: skip


def test_export_writes_markdown_and_json(ctx):
    hist = [{"role": "user", "content": "what?", "images": ["/x/y/cat.png"]}, {"role": "assistant", "content": "A cat"}]
    md = export_conversation(ctx, hist, "markdown", {})
    js = export_conversation(ctx, hist, "json", {"model": "m"})
    assert "![cat.png](cat.png)" in Path(md).read_text()
    assert json.loads(Path(js).read_text())["messages"][0]["images"] == ["cat.png"]
    with pytest.raises(ValueError, match="empty"):
        export_conversation(ctx, [], "json", {})


def test_dataset_must_be_inside_the_data_folder(ctx):
    assert dataset_path(ctx, "sets/a.jsonl") == (ctx.settings.data_dir / "sets" / "a.jsonl").resolve()
    for bad in ("../a.jsonl", "/etc/passwd"):
        with pytest.raises(ValueError):
            dataset_path(ctx, bad)


def test_model_info_labels_the_demo_model(ctx):
    text = model_info(ctx.backends.vlm, "tiny-llava-demo")
    assert "untrained demo model" in text and "4 images" in text and "static cache + CUDA graph" in text
