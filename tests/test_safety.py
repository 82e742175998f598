import os
import pickle
from pathlib import Path

import pytest
import torch

from studio.safety import (
    UnsafePathError,
    WeightsError,
    atomic_write_bytes,
    atomic_writer,
    contained_path,
    load_safetensors,
    load_torch_weights,
    safe_filename,
    safetensors_header,
    safetensors_numel,
    save_safetensors,
)


@pytest.mark.parametrize(
    "name", ["../x", "a/../../x", "/etc/passwd", "C:\\Windows", "c:/x", "\\\\server\\s", "a\x00b", ""]
)
def test_contained_path_refuses_escapes(tmp_path: Path, name: str):
    with pytest.raises(UnsafePathError):
        contained_path(tmp_path, name)


def test_contained_path_refuses_symlink_out(tmp_path: Path):
    (tmp_path / "base").mkdir()
    os.symlink("/etc", tmp_path / "base" / "link")
    with pytest.raises(UnsafePathError):
        contained_path(tmp_path / "base", "link/passwd")


def test_contained_path_accepts_plain_names(tmp_path: Path):
    assert contained_path(tmp_path, "sub/file.txt") == (tmp_path / "sub" / "file.txt").resolve()


def test_safe_filename():
    assert safe_filename("../../etc/passwd") == "etc_passwd"
    assert safe_filename("..") == "untitled"
    assert safe_filename("my lora (v2).safetensors") == "my_lora_v2_.safetensors"


def test_atomic_write_keeps_previous_file_on_failure(tmp_path: Path):
    target = tmp_path / "adapter.bin"
    atomic_write_bytes(target, b"good")
    with pytest.raises(OSError), atomic_writer(target) as f:
        f.write(b"partial")
        raise OSError("No space left on device")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.bin"]  # no temp file left behind


def test_safetensors_round_trip_and_truncation(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.arange(1000, dtype=torch.float32)}, path)
    assert torch.equal(load_safetensors(path)["a"], torch.arange(1000, dtype=torch.float32))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_safetensors(path)


def test_lfs_pointer_and_missing_file(tmp_path: Path):
    pointer = tmp_path / "model.safetensors"
    pointer.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(WeightsError, match="git-LFS pointer"):
        load_safetensors(pointer)
    with pytest.raises(WeightsError, match="not found"):
        load_safetensors(tmp_path / "nope.safetensors")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + str(Path(os.environ["EVIL_MARKER"])),))


def test_malicious_pickle_does_not_run(tmp_path: Path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"w": _Evil()}))
    with pytest.raises(WeightsError, match="refused"):
        load_torch_weights(path)
    assert not marker.exists()


def test_atomic_folder_leaves_nothing_on_error_and_can_keep_a_winner(tmp_path: Path):
    from studio.safety import atomic_folder

    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_folder(target) as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-save")
    assert list(tmp_path.iterdir()) == []
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("first")
    with atomic_folder(target, replace=False) as tmp:
        (tmp / "a").write_text("second")
    assert (target / "a").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with atomic_folder(target) as tmp:
        (tmp / "b").write_text("third")
    assert [p.name for p in target.iterdir()] == ["b"]


def test_allowed_path_keeps_requests_inside_the_owners_folders(tmp_path):
    from studio.safety import UnsafePathError, allowed_path

    root, models = tmp_path / "ingest", tmp_path / "models"
    (root / "notes").mkdir(parents=True)
    models.mkdir()
    (root / "out").symlink_to(tmp_path)
    assert allowed_path(str(root / "notes"), (root,), (models,)) == (root / "notes").resolve()
    for bad in (str(tmp_path), "/etc", str(root / "notes/../.."), str(root / "out"), "", "a\x00b"):
        with pytest.raises(UnsafePathError):
            allowed_path(bad, (root,), (models,))
    with pytest.raises(UnsafePathError, match="models, cache or config"):
        allowed_path(str(tmp_path), (tmp_path,), (models,))  # a root that holds the models folder is refused too


def test_reserved_windows_names_and_unguessable_stamps():
    from studio.safety import safe_filename, unguessable_stamp

    assert (
        safe_filename("CON") == "_CON"
        and safe_filename("nul.txt") == "_nul.txt"
        and safe_filename("console") == "console"
    )
    stamps = {unguessable_stamp() for _ in range(50)}
    assert len(stamps) == 50 and all(len(s.split("-")[-1]) == 12 for s in stamps)


def test_orphan_temps_are_removed_but_young_ones_and_other_files_kept(tmp_path):
    import os

    from studio.safety import atomic_write_bytes, remove_orphan_temps

    old, young, mine = tmp_path / ".a.pt.Ab3_x9Zq.tmp", tmp_path / ".b.pt.Cd4_y8Wr.tmp", tmp_path / "notes.tmp"
    folder = tmp_path / "sub" / ".pipe.Qw12_erT.tmp"
    folder.mkdir(parents=True)
    for p in (old, young, mine):
        p.write_bytes(b"x")
    for p in (old, mine, folder):
        os.utime(p, (1_000_000, 1_000_000))
    assert sorted(remove_orphan_temps([tmp_path])) == sorted([old, folder])
    assert young.exists() and mine.exists()
    atomic_write_bytes(tmp_path / "c.bin", b"ok")  # our writer's temp names match the pattern and are gone after
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.bin")] == []


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    from studio.safety import atomic_path

    target = tmp_path / "last.pt"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-save")
    assert target.read_bytes() == b"good" and list(tmp_path.iterdir()) == [target]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_kb_name_con_is_refused_with_a_usable_suggestion():
    from backends.rag.store import KnowledgeBaseError, check_kb_name

    for name in ("CON", "nul", "COM1"):
        with pytest.raises(KnowledgeBaseError) as e:
            check_kb_name(name)
        assert f"'{name}-notes'" in str(e.value) or "-notes" in str(e.value)


def test_safetensors_header_reads_shapes_and_refuses_a_cut_file(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}, path, metadata={"k": "v"})
    header = safetensors_header(path)
    assert header["a"] == {"dtype": "F32", "shape": [3, 4]} and header["b"]["shape"] == [5]
    assert header["__metadata__"] == {"k": "v"} and safetensors_numel(path) == 17
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="truncated"):
        safetensors_header(path)
