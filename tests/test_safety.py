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


def test_safetensors_header_reads_shapes_and_refuses_a_cut_file(tmp_path: Path):
    path = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.zeros(3, 4), "b": torch.zeros(5, dtype=torch.float16)}, path, metadata={"k": "v"})
    header = safetensors_header(path)
    assert header["a"] == {"dtype": "F32", "shape": [3, 4]} and header["b"]["shape"] == [5]
    assert header["__metadata__"] == {"k": "v"} and safetensors_numel(path) == 17
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(WeightsError, match="truncated"):
        safetensors_header(path)
