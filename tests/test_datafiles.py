"""studio.datafiles: decoding users' files and reading JSONL lines, and the three dataset readers that share it
(Whisper manifests, VLM datasets, fine-tune datasets) on BAD_INPUTS.md's cases: empty file, BOM, CRLF, non-UTF-8,
a line that is JSON but not an object."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backends.audio import DatasetError, write_wav
from backends.audio.tune_data import load_examples as audio_examples
from backends.finetune import DataError
from backends.finetune.data import load_conversations
from backends.vlm import ImageOptions, VLMError
from backends.vlm.data import load_examples as vlm_examples
from studio.datafiles import TextFileError, jsonl_lines, read_text
from tests._vlm_support import solid


def test_read_text_accepts_utf8_with_or_without_bom_and_utf16_with_one(tmp_path):
    for name, raw in [("plain", "café".encode()), ("bom", b"\xef\xbb\xbf" + "café".encode()),
                      ("le", "café".encode("utf-16")), ("be", b"\xfe\xff" + "café".encode("utf-16-be"))]:  # fmt: skip
        (tmp_path / name).write_bytes(raw)
        assert read_text(tmp_path / name) == "café", name


@pytest.mark.parametrize(
    ("raw", "where", "what"),
    [
        (b"ok\nline two caf\xe9\n", "f.txt:2", "not UTF-8 text (byte 15 is 0xE9)"),  # latin-1
        ("ab\ncd".encode("utf-16-le"), "f.txt:1", "null bytes (UTF-16 without a byte-order mark"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "f.txt:3", "null bytes"),  # binary
    ],
)
def test_read_text_names_the_line_and_what_to_do(tmp_path, raw, where, what):
    (tmp_path / "f.txt").write_bytes(raw)
    with pytest.raises(TextFileError) as e:
        read_text(tmp_path / "f.txt")
    assert e.value.where == where and what in str(e.value) and str(e.value).endswith("save it as UTF-8.")
    with pytest.raises(TextFileError, match=r"^shown/name:"):
        read_text(tmp_path / "f.txt", "shown/name")


def test_jsonl_lines_crlf_bom_blank_lines_and_raw_unicode_line_breaks(tmp_path):
    rows = [{"a": 1}, {"a": "two\u2028lines\x85and\x0cmore"}, {"a": 3}]
    text = "\ufeff" + json.dumps(rows[0]) + "\r\n\r\n" + json.dumps(rows[1], ensure_ascii=False) + "\r\n"
    text += "\ufeff" + json.dumps(rows[2]) + "\n  \n"  # a second BOM: two files joined with `cat`
    (tmp_path / "d.jsonl").write_text(text, encoding="utf-8", newline="")
    lines = list(jsonl_lines(tmp_path / "d.jsonl", example="{}"))
    assert [(x.where, x.value, x.problem) for x in lines] == [
        ("d.jsonl:1", rows[0], ""),
        ("d.jsonl:3", rows[1], ""),  # str.splitlines() would cut this line at U+2028, U+0085 and the form feed
        ("d.jsonl:4", rows[2], ""),
    ]
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(jsonl_lines(tmp_path / "empty.jsonl", example="{}")) == []


def test_jsonl_lines_that_are_not_objects_get_the_callers_hint(tmp_path):
    (tmp_path / "d.jsonl").write_text('[\n{"a": 1},\n[1, 2]\n"text"\n3\nnull\ntrue\n{"a": \n]\n', encoding="utf-8")
    problems = {x.where: x.problem for x in jsonl_lines(tmp_path / "d.jsonl", example='{"a": ...}')}
    assert problems["d.jsonl:1"].startswith("not valid JSON (Expecting value at column 2)")
    assert "one array" in problems["d.jsonl:1"]  # a pretty-printed .json saved as .jsonl
    assert problems["d.jsonl:2"].startswith("not valid JSON (Extra data at column 9)")
    for n, kind in [(3, "a list"), (4, "a string"), (5, "a number"), (6, "null"), (7, "true/false")]:
        assert problems[f"d.jsonl:{n}"] == f'each line must be a JSON object like {{"a": ...}}, not {kind}'
    assert problems["d.jsonl:8"].startswith("not valid JSON") and "array" not in problems["d.jsonl:8"]


# The three dataset readers: (write a good line for example i, load the file -> number of examples or raise)
def _audio(folder, i):
    t = np.arange(1600) / 16000
    write_wav(folder / f"{i}.wav", (0.1 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32))
    return {"audio": f"{i}.wav", "text": f"clip {i}\u2028end"}


def _vlm(folder, i):
    solid(folder / f"{i}.png", ["red", "green", "blue"][i])
    conv = [{"role": "user", "content": f"Q{i}\u2028?"}, {"role": "assistant", "content": f"A{i}"}]
    return {"images": [f"{i}.png"], "conversations": conv}


def _finetune(folder, i):
    return {"prompt": f"Q{i}\u2028?", "completion": f"A{i}"}


READERS = {
    "audio": ("manifest.jsonl", _audio, lambda p: len(audio_examples(p.parent)), DatasetError, "no examples"),
    "vlm": ("d.jsonl", _vlm, lambda p: len(vlm_examples(p, ImageOptions())), VLMError, "holds no examples"),
    "finetune": ("d.jsonl", _finetune, lambda p: len(load_conversations(p)[0]), DataError, "holds no records"),
}


@pytest.mark.parametrize("reader", sorted(READERS))
def test_dataset_readers_share_the_jsonl_rules(tmp_path, reader):
    name, good, load, error, empty = READERS[reader]
    path = tmp_path / name
    rows = [json.dumps(good(tmp_path, i), ensure_ascii=False) for i in range(3)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(rows).encode())  # BOM + CRLF + a raw U+2028 in each line
    assert load(path) == 3
    path.write_text(f"{rows[0]}\n[1, 2]\n{rows[1]}\n", encoding="utf-8")
    with pytest.raises(error) as e:
        load(path)
    text = str(e.value)
    assert f"{name}:2: each line must be a JSON object like {{" in text and "not a list" in text, text
    assert f"{name}:1:" not in text and f"{name}:3:" not in text
    path.write_bytes(rows[0].encode() + '\n{"x": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(error, match=rf"{name}:2: not UTF-8 text \(byte \d+ is 0xE9\); save it as UTF-8"):
        load(path)
    path.write_bytes(b"")
    with pytest.raises(error, match=empty):
        load(path)
