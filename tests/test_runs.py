"""RunStore: records with config, seed, versions, dataset hash, metrics over time and artifacts."""

from __future__ import annotations

import json
import time
from importlib import metadata

import pytest

from studio.runs import RunStore, hash_dataset, package_versions, read_metrics


@pytest.fixture
def store(tmp_path):
    return RunStore(tmp_path / "runs")


def test_create_writes_a_complete_record(store, tmp_path):
    data = tmp_path / "ds"
    data.mkdir()
    (data / "a.txt").write_text("hello")
    h = hash_dataset(data)
    run = store.create("sd_lora", {"lr": 1e-4, "rank": 8, "out": tmp_path}, seed=7, dataset_hash=h)
    assert run.dir.parent == store.root and run.dir.name == run.id
    rec = json.loads((run.dir / "record.json").read_text())
    assert rec["kind"] == "sd_lora" and rec["seed"] == 7 and rec["dataset_hash"] == h
    assert rec["config"] == {"lr": 1e-4, "rank": 8, "out": str(tmp_path)}
    assert rec["status"] == "running" and rec["finished"] is None and rec["started"] <= time.time()
    assert rec["versions"]["python"].count(".") == 2
    assert rec["versions"]["gradio"] == metadata.version("gradio")
    assert rec["versions"]["torch"] == metadata.version("torch")


def test_package_versions_does_not_import_packages():
    import sys

    before = "diffusers" in sys.modules
    v = package_versions(("diffusers", "no-such-package-xyz"))
    assert v["no-such-package-xyz"] is None
    assert ("diffusers" in sys.modules) == before


def test_metrics_append_and_read_back_in_order(store):
    run = store.create("yolo-train", {"epochs": 3})
    for step in range(5):
        run.log_metrics(step, loss=1.0 / (step + 1), lr=0.01)
    run.log_metrics(5, loss=float("nan"))
    rows = store.metrics(run.id)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[2]["loss"] == pytest.approx(1 / 3) and rows[2]["lr"] == 0.01
    assert rows[5]["loss"] is None  # NaN stored as null, file stays valid JSON
    with pytest.raises(ValueError, match="at least one metric"):
        run.log_metrics(6)


def test_torn_metrics_line_is_skipped(store):
    run = store.create("eval", {})
    run.log_metrics(1, acc=0.5)
    with (run.dir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "acc": 0.')  # crash mid-write
    rows = read_metrics(run.dir / "metrics.jsonl")
    assert [(r["step"], r["acc"]) for r in rows] == [(1, 0.5)]
    assert run.last_metrics()["step"] == 1


def test_last_metrics_reads_the_tail_of_a_long_file(store):
    run = store.create("train", {})
    assert run.last_metrics() == {}
    for step in range(3000):
        run.log_metrics(step, loss=1 / (step + 1))
    last = run.last_metrics()
    assert last["step"] == 2999 and last["loss"] == pytest.approx(1 / 3000)


def test_finish_and_artifacts_persist(store, tmp_path):
    run = store.create("sd_lora", {"steps": 10})
    outside = tmp_path / "lora.safetensors"
    outside.write_bytes(b"x" * 100)
    copied = run.add_artifact(outside)
    assert copied == (run.dir / "artifacts" / "lora.safetensors").resolve() and copied.read_bytes() == b"x" * 100
    inside = run.dir / "sample.png"
    inside.write_bytes(b"png")
    assert run.add_artifact(inside, name="sample") == inside.resolve()
    run.finish("done", final_loss=0.12, steps=10)
    again = store.get(run.id)
    assert again.status == "done" and again.record["finished"] >= again.record["started"]
    assert again.record["summary"] == {"final_loss": 0.12, "steps": 10}
    assert {a["name"]: (a["path"], a["bytes"]) for a in again.artifacts} == {
        "lora.safetensors": ("artifacts/lora.safetensors", 100),
        "sample": ("sample.png", 3),
    }
    with pytest.raises(ValueError, match="finish status"):
        run.finish("exploded")
    with pytest.raises(FileNotFoundError):
        run.add_artifact(tmp_path / "missing.bin")


def test_artifact_name_cannot_escape_the_run(store, tmp_path):
    run = store.create("x", {})
    f = tmp_path / "f.bin"
    f.write_bytes(b"1")
    with pytest.raises(ValueError, match="outside"):
        run.add_artifact(f, name="../../evil.bin")
    assert not (store.root / "evil.bin").exists()


def test_list_newest_first_and_skips_broken_records(store):
    ids = []
    for i in range(3):
        ids.append(store.create("k", {"i": i}).id)
    (store.root / "junk").mkdir()
    broken = store.root / "99999999-broken"
    broken.mkdir()
    (broken / "record.json").write_text("{not json")
    assert [r.id for r in store.list()] == ids[::-1]
    assert sorted(ids) == ids  # ids sort by creation time
    assert len(set(ids)) == 3


def test_get_refuses_ids_outside_the_store(store, tmp_path):
    run = store.create("k", {})
    assert store.get(run.id).id == run.id
    (tmp_path / "record.json").write_text(json.dumps({"id": "outside"}))
    for bad in ["../", "..", "../record.json", "/etc", "", f"{run.id}/../..", f"{run.id}/artifacts"]:
        with pytest.raises(KeyError):
            store.get(bad)
    with pytest.raises(KeyError, match="no run"):
        store.get("20990101-000000-000000-beef-k")


def test_empty_store_lists_nothing(tmp_path):
    assert RunStore(tmp_path / "none").list() == []


def test_create_rejects_bad_kind(store):
    for bad in ["", "../x", "a b", "x/y"]:
        with pytest.raises(ValueError, match="kind"):
            store.create(bad, {})


def test_hash_dataset_depends_on_names_and_contents_not_location(tmp_path):
    def make(root, files):
        root.mkdir()
        for rel, content in files.items():
            p = root / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
        return root

    base = {"img/1.jpg": b"one", "img/2.jpg": b"two", "labels.txt": b"cat\ndog"}
    h1 = hash_dataset(make(tmp_path / "a", base))
    assert h1 == hash_dataset(make(tmp_path / "b", base))  # same content elsewhere
    assert len(h1) == 64
    assert h1 != hash_dataset(make(tmp_path / "c", {**base, "labels.txt": b"cat\ndoG"}))
    renamed = {"img/1.jpg": b"one", "img/3.jpg": b"two", "labels.txt": b"cat\ndog"}
    assert h1 != hash_dataset(make(tmp_path / "d", renamed))
    assert h1 != hash_dataset(make(tmp_path / "e", {**base, "extra": b""}))
    # boundaries between name and content cannot be shifted to collide
    assert hash_dataset(make(tmp_path / "f", {"ab": b"c"})) != hash_dataset(make(tmp_path / "g", {"a": b"bc"}))
    # a single file works, and streaming in small chunks gives the same digest
    big = tmp_path / "big.bin"
    big.write_bytes(bytes(range(256)) * 5000)
    assert hash_dataset(big, chunk=1000) == hash_dataset(big)
    with pytest.raises(FileNotFoundError):
        hash_dataset(tmp_path / "nope")


def test_metrics_with_a_line_separator_inside_a_string_read_as_one_row(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "note": "pasted\u2028text"}\n{"step": 2}\n{"step": 3, "lo', encoding="utf-8")
    rows = read_metrics(path)  # the torn last line is skipped
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["note"] == "pasted\u2028text"
