"""Fine-tune datasets: every format and file type, file:line problems, duplicates, the fixed dev split (no torch)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from backends.finetune import DataError, DataOptions
from backends.finetune.data import load_conversations, split_dataset
from backends.finetune.task import make_task

RECORDS = {
    "messages": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                              {"role": "assistant", "content": "4"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
    "prompt_completion": {"prompt": "2+2?", "completion": "4"},
}  # fmt: skip


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize("fmt", sorted(RECORDS))
def test_every_format_becomes_a_conversation(tmp_path, fmt):
    convs, report = load_conversations(write_jsonl(tmp_path / "d.jsonl", [RECORDS[fmt]]))
    assert report.format == fmt and report.valid == 1
    conv = convs[0]
    assert conv[-1] == {"role": "assistant", "content": "4"}
    assert conv[-2]["role"] == "user" and "2" in conv[-2]["content"]


def test_json_csv_and_parquet_files(tmp_path):
    import polars as pl

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["prompt", "completion"])
        w.writeheader()
        w.writerows(rows)
    pl.DataFrame(rows).write_parquet(tmp_path / "d.parquet")
    msgs = [{"messages": json.dumps([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])}]
    with (tmp_path / "m.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, ["messages"])
        w.writeheader()
        w.writerows(msgs)
    for name in ("d.json", "d.csv", "d.parquet"):
        convs, report = load_conversations(tmp_path / name)
        assert report.valid == 4 and convs[2][-1]["content"] == "a2", name
    assert load_conversations(tmp_path / "m.csv")[0][0][1]["content"] == "y"


def test_problems_are_reported_with_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        RECORDS["messages"],
        '{"messages": [{"role": "user", "content": "hi"}',  # line 2: malformed
        {"question": "wrong keys", "answer": "x"},  # line 3
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},  # line 4
        {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]},  # line 5
        {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "x"}]},  # line 6
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        load_conversations(path)
    text = str(e.value)
    assert "5 of 6 records in bad.jsonl" in text
    for where, what in [("bad.jsonl:2", "not valid JSON"), ("bad.jsonl:3", "unknown keys"),
                        ("bad.jsonl:4", "empty assistant answer"), ("bad.jsonl:5", "unknown role 'wizard'"),
                        ("bad.jsonl:6", "before any user turn")]:  # fmt: skip
        assert f"{where}: " in text and what in text, (where, text)
    convs, report = load_conversations(path, skip_invalid=True)
    assert len(convs) == 1 and len(report.problems) == 5


def test_unreadable_files_give_a_clear_message(tmp_path):
    (tmp_path / "latin.jsonl").write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_conversations(tmp_path / "latin.jsonl")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_conversations(tmp_path / "x.txt")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet"):
        load_conversations(tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="not found"):
        load_conversations(tmp_path / "missing.jsonl")


def test_duplicates_are_counted_and_dropped(tmp_path):
    rows = [RECORDS["prompt_completion"]] * 3 + [{"prompt": "other", "completion": "y"}]
    convs, report = load_conversations(write_jsonl(tmp_path / "d.jsonl", rows))
    assert len(convs) == 2 and report.duplicates == 2


def test_dev_split_is_fixed_by_hash_whatever_the_order(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(200)]
    a = split_dataset(DataOptions(str(write_jsonl(tmp_path / "a.jsonl", rows)), dev_fraction=0.1))
    b = split_dataset(DataOptions(str(write_jsonl(tmp_path / "b.jsonl", rows[::-1])), dev_fraction=0.1))
    dev_a = sorted(c[0]["content"] for c in a[1])
    assert dev_a == sorted(c[0]["content"] for c in b[1])
    assert 8 <= len(dev_a) <= 35 and a[2].train + a[2].dev == 200
    dev_file = write_jsonl(tmp_path / "dev.jsonl", rows[:5])
    train, dev, report = split_dataset(DataOptions(str(tmp_path / "a.jsonl"), dev_path=str(dev_file)))
    assert len(dev) == 5 and len(train) == 195 and report.duplicates == 5  # dev examples left the training set
    assert report.preview and "messages" in report.preview[0]


def test_options_are_checked():
    with pytest.raises(DataError, match="No dataset"):
        DataOptions("")
    with pytest.raises(DataError, match="max length"):
        DataOptions("x.jsonl", max_length=4)
    with pytest.raises(DataError, match="overlong"):
        DataOptions("x.jsonl", overlong="wrap")


def test_shakespeare_task_is_real_and_repeatable(tmp_path):
    a, b = make_task(40, seed=1), make_task(40, seed=1)
    assert a == b and make_task(40, seed=2) != a
    questions = [r["messages"][0]["content"] for r in a]
    assert len(set(questions)) == 40
    assert any("Hamlet" in r["messages"][1]["content"] for r in a)
    for r in a:  # the quoted line is really in the shipped texts
        assert r["messages"][1]["content"].strip()
    path = write_jsonl(tmp_path / "task.jsonl", a)
    _, report = load_conversations(path)
    assert report.valid == 40 and report.format == "messages"


def test_the_full_sample_task_covers_all_eight_plays():
    titles = {r["messages"][1]["content"] for r in make_task(400) if r["messages"][0]["content"].startswith("Which")}
    assert {"Hamlet", "Macbeth", "A Midsummer Night's Dream", "The Tempest"} <= titles
