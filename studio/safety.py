"""Path containment, safe weight loading, atomic writes and upload limits.

Invariants: a user-given name never resolves outside its base folder; weights load from safetensors, and
pickles only through `torch.load(weights_only=True)`; every save is temp file + fsync + os.replace, so a crash
or a full disk leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_WINDOWS_ABS = re.compile(r"^[A-Za-z]:[\\/]")
_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


class UnsafePathError(ValueError):
    """A user-given name tried to leave its folder."""


class WeightsError(ValueError):
    """A weights file is missing, truncated, a git-LFS pointer, or not a safe format."""


def contained_path(base: Path, name: str) -> Path:
    """`base / name`, refusing absolute paths, drive letters, `..` and symlinks that lead out of `base`."""
    if not name or "\x00" in name:
        raise UnsafePathError(f"Invalid name {name!r}: it is empty or contains a null byte.")
    if os.path.isabs(name) or _WINDOWS_ABS.match(name) or name.startswith("\\"):
        raise UnsafePathError(f"Invalid name {name!r}: absolute paths are not allowed; give a plain name.")
    base_resolved = base.resolve()
    target = (base_resolved / name).resolve()
    if target != base_resolved and base_resolved not in target.parents:
        raise UnsafePathError(f"Invalid name {name!r}: it points outside {base}.")
    return target


def safe_filename(name: str, default: str = "untitled") -> str:
    """A name usable as one path component: letters, digits, '-', '_', '.'; never '..' or hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip()).strip("._")
    return cleaned[:120] or default


@contextlib.contextmanager
def atomic_writer(path: Path, mode: str = "wb") -> Iterator[Any]:
    """Open a temp file beside `path`; on success fsync and rename over it, on error delete the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(target: Path, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temp folder beside `target` to fill; on success rename it into place, on error delete it, so a
    half-written folder is never picked up. An existing `target` is replaced, or with `replace=False` kept (another
    process built the same folder first) and ours discarded."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        yield tmp
        if target.exists():
            if not replace:
                return
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str))


def check_weights_file(path: Path) -> None:
    """Refuse a missing file, an empty file or a git-LFS pointer before any loader sees it."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}")
    size = path.stat().st_size
    if size == 0:
        raise WeightsError(f"Weights file is empty: {path}")
    if size < 1024:
        with path.open("rb") as f:
            if f.read(len(_LFS_POINTER)) == _LFS_POINTER:
                raise WeightsError(
                    f"{path} is a git-LFS pointer, not the weights: run `git lfs pull` or download the file again."
                )


def safetensors_header(path: Path) -> dict[str, Any]:
    """A safetensors file's tensors ({name: {"dtype", "shape"}}, plus "__metadata__"), read with safetensors' own
    parser, which also checks that the file holds every byte the header promises (catches truncation)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    check_weights_file(path)
    try:
        with safe_open(str(path), framework="np") as f:
            header: dict[str, Any] = {
                name: {"dtype": f.get_slice(name).get_dtype(), "shape": f.get_slice(name).get_shape()}
                for name in f.keys()  # noqa: SIM118 (safe_open is not a mapping)
            }
            header["__metadata__"] = f.metadata() or {}
    except SafetensorError as e:
        raise WeightsError(
            f"{path} is truncated or not a safetensors file ({e}); download or convert it again."
        ) from None
    return header


def safetensors_numel(path: Path) -> int:
    """Number of parameters in a safetensors file, read from its (checked) header only."""
    header = safetensors_header(path)
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


def save_safetensors(tensors: dict[str, Any], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file (tensors are made contiguous and moved to CPU)."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def load_safetensors(path: Path, device: str = "cpu") -> dict[str, Any]:
    """Load a safetensors file, turning a truncated or corrupt file into a WeightsError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_weights_file(path)
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def load_torch_weights(path: Path, map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True: a malicious pickle raises instead of running."""
    import pickle

    import torch

    check_weights_file(path)
    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise WeightsError(
            f"{path} was refused: it is not a plain weights file (pickled code or corrupt data). "
            f"Convert it to safetensors. Detail: {str(e).splitlines()[0]}"
        ) from None


def check_upload_size(path: Path, max_bytes: int) -> None:
    size = Path(path).stat().st_size
    if size > max_bytes:
        raise ValueError(f"Upload is {size / 2**20:.0f} MB; the limit is {max_bytes / 2**20:.0f} MB.")
